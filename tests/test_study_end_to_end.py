"""`nnunet_kd study` through the real nnU-Net CLI: 2 seeds x (plain student, KD student), a tiny schedule, CPU; then
studies of KD from stored teacher targets that take that study's plain runs (--baseline-from)."""
import csv
import json
from pathlib import Path

import pytest
from conftest import DATASET_ID, STUDENT_PLANS

from nnunet_kd.core.checkpoints import load_checkpoint


def _study(workspace, teacher_3d, output, *extra, seeds=("0", "1"), check=True,
           trainers=("nnUNetTrainerStudent", "nnUNetTrainerKDLogits")):
    """The plain student and KDLogits on the test set, 2 epochs of 2 iterations."""
    return workspace.run(
        "nnunet_kd", "study", str(DATASET_ID), "-c", "3d_fullres", "-p", STUDENT_PLANS, "--teacher", teacher_3d.name,
        "--trainers", *trainers, "--seeds", *seeds,
        "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--device", "cpu", "--time-cases", "0",
        "--test-images", str(workspace.raw / "imagesTs"), "--test-labels", str(workspace.raw / "labelsTs"),
        "-o", str(output), *extra, check=check)


@pytest.fixture(scope="module")
def paired_study(workspace, teacher_3d, tmp_path_factory) -> tuple[Path, str]:
    """The study folder and what its first invocation printed."""
    output = tmp_path_factory.mktemp("paired_study") / "study"
    first = _study(workspace, teacher_3d, output, "--jobs", "2")  # two runs at once
    return output, first.stdout


def test_study_trains_paired_seeds_reports_and_resumes(workspace, teacher_3d, paired_study):
    output, first_stdout = paired_study
    assert "run 4 of 4" in first_stdout

    runs = {(seed, trainer): output / "runs" / f"seed_{seed}" / workspace.results.name
            / f"{trainer}__{STUDENT_PLANS}__3d_fullres" / "fold_0"
            for seed in (0, 1) for trainer in ("nnUNetTrainerStudent", "nnUNetTrainerKDLogits")}
    for fold in runs.values():
        assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    # the study's schedule reached the trainer: 2 epochs of 2 iterations
    kd_record = json.loads((runs[1, "nnUNetTrainerKDLogits"] / "kd_settings.json").read_text())
    assert kd_record["seed"] == 1
    assert kd_record["schedule"] == {"num_epochs": 2, "num_iterations_per_epoch": 2,
                                     "num_val_iterations_per_epoch": 1}
    assert len(load_checkpoint(runs[0, "nnUNetTrainerStudent"] / "checkpoint_final.pth")["logging"]["ema_fg_dice"]) == 2
    # same seed, same initial weights: nnU-Net's checkpoints do not keep them, but the trainers log the seed
    for seed in (0, 1):
        for trainer in ("nnUNetTrainerStudent", "nnUNetTrainerKDLogits"):
            assert (output / "predictions" / f"seed_{seed}" / trainer / "summary.json").is_file()
    assert (output / "predictions" / "teacher" / "summary.json").is_file()

    report = (output / "report.md").read_text()
    assert "Trained on: CPU" in report and "nnunetv2 2." in report
    assert "## Dice, validation (fold 0)" in report and "## Dice, test set: 2 cases" in report
    assert "| nnUNetTrainerKDLogits | 2 |" in report and "95 % CI" in report
    assert "| nnUNetTrainerStudent (baseline) | 2 |" in report
    assert (output / "study.png").stat().st_size > 10_000
    comparison = json.loads((output / "comparison.json").read_text())["comparisons"]
    kd = comparison["validation"]["nnUNetTrainerKDLogits"]
    assert kd["seeds"] == [0, 1] and kd["ci95"][0] <= kd["mean_difference"] <= kd["ci95"][1]
    assert sum(kd["won_lost_tied"]) == 2 * 2  # 2 seeds x 2 validation cases
    csv_lines = (output / "per_case_dice.csv").read_text().splitlines()
    assert csv_lines[0].startswith("split,model,seed,case,")
    # teacher: 2 validation + 2 test cases; 4 runs x (2 validation + 2 test)
    assert len(csv_lines) == 1 + 4 + 4 * 4

    # re-running trains nothing: every run is reported done and no checkpoint changes
    stamps = {k: (v / "checkpoint_final.pth").stat().st_mtime for k, v in runs.items()}
    again = _study(workspace, teacher_3d, output)
    assert again.stdout.count(": done") == 4 and "training" not in again.stdout
    assert stamps == {k: (v / "checkpoint_final.pth").stat().st_mtime for k, v in runs.items()}


def test_study_lesions_scores_every_test_prediction_of_a_study(workspace, paired_study):
    study, _ = paired_study
    result = workspace.run("nnunet_kd", "study-lesions", str(study), "--label", "1")
    assert "## Lesion scores, test set: 2 cases, label 1" in result.stdout
    assert "| nnUNetTrainerKDLogits | fp_ml_lesion_free_slices | 2 | " in result.stdout
    assert "no claim (2 seeds)" in result.stdout
    rows = list(csv.DictReader(open(study / "per_case_lesions.csv")))
    assert len(rows) == 2 + 2 * 2 * 2  # the teacher's 2 test cases, then 2 seeds x 2 trainers x 2 cases
    # the Dice here is nnU-Net's own for label 1, case by case
    for row in rows:
        run = "teacher" if row["model"] == "teacher" else f"seed_{row['seed']}/{row['model']}"
        folder = study / "predictions" / run
        nnunet = {Path(c["reference_file"]).name.split(".")[0]: c["metrics"]["1"]["Dice"]
                  for c in json.loads((folder / "summary.json").read_text())["metric_per_case"]}
        assert float(row["dice"]) == pytest.approx(nnunet[row["case"]], abs=1e-6, nan_ok=True)


def test_study_refuses_changed_settings_and_unknown_trainers_before_training(workspace, teacher_3d, tmp_path):
    output = tmp_path / "study"
    unknown = workspace.run("nnunet_kd", "study", str(DATASET_ID), "-p", STUDENT_PLANS, "--teacher", teacher_3d.name,
                            "--trainers", "nnUNetTrainerStudent", "nnUNetTrainerKDLogitz", "--device", "cpu",
                            "-o", str(output), check=False)
    assert unknown.returncode == 2 and "nnUNetTrainerKDLogitz not found" in unknown.stderr
    assert not (output / "runs").exists()

    output.mkdir()
    (output / "study.json").write_text(json.dumps({"plans": "other_plans"}))
    changed = workspace.run("nnunet_kd", "study", str(DATASET_ID), "-p", STUDENT_PLANS, "--teacher", teacher_3d.name,
                            "--device", "cpu", "-o", str(output), check=False)
    assert changed.returncode == 2 and "other settings" in changed.stderr and "plans" in changed.stderr
    assert not (output / "runs").exists()


def test_a_seed_starts_the_plain_and_the_kd_student_from_the_same_weights(workspace, monkeypatch, tmp_path):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for key, value in workspace.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # the trainers create their output folders there

    def initial_weights(trainer: str, seed: int) -> dict:
        monkeypatch.setenv("nnUNet_KD_seed", str(seed))
        run = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, trainer, STUDENT_PLANS,
                                    device=torch.device("cpu"))
        run.initialize()
        return run.network.state_dict()

    plain, kd = initial_weights("nnUNetTrainerStudent", 3), initial_weights("nnUNetTrainerKDLogits", 3)
    other_seed = initial_weights("nnUNetTrainerKDLogits", 4)
    assert plain.keys() == kd.keys()
    assert all(torch.equal(plain[k], kd[k]) for k in plain)
    assert not all(torch.equal(kd[k], other_seed[k]) for k in kd)


# ---- KD from stored teacher targets, against the online KD of the study above ----
@pytest.fixture(scope="module")
def stored_target_study(workspace, teacher_3d, targets_3d, paired_study, tmp_path_factory) -> tuple[Path, str]:
    """Seed 0 of KDLogits from the stored targets; its plain run is the paired study's (--baseline-from)."""
    study = tmp_path_factory.mktemp("stored_target_study") / "study"
    result = _study(workspace, teacher_3d, study, "--teacher-targets", targets_3d.name,
                    "--baseline-from", str(paired_study[0]), seeds=("0",))
    return study, result.stdout


def test_study_runs_kd_from_stored_targets_on_the_plain_runs_of_another_and_compares(
        workspace, teacher_3d, targets_3d, paired_study, stored_target_study, tmp_path):
    refused = _study(workspace, teacher_3d, tmp_path / "refused", "--teacher-targets", "no_such_targets",
                     seeds=("0",), check=False)
    assert refused.returncode == 2 and "no stored teacher targets there" in refused.stderr
    assert not (tmp_path / "refused" / "runs").exists()

    (online, _), (stored, stdout) = paired_study, stored_target_study
    runs = Path("runs") / "seed_0" / workspace.results.name
    record = json.loads((stored / runs / f"nnUNetTrainerKDLogits__{STUDENT_PLANS}__3d_fullres" / "fold_0" /
                         "kd_settings.json").read_text())
    assert record["teacher_targets"]["folder"] == str(targets_3d.resolve()) and record["seed"] == 0
    assert "learn from the stored teacher targets" in (stored / "report.md").read_text()

    # the plain run and its test predictions are the online study's (the same run: no teacher in it)
    assert "baseline runs of seeds [0] copied from" in stdout
    assert "seed 0, nnUNetTrainerStudent: done" in stdout and "nnUNetTrainerStudent: training" not in stdout
    checkpoint = runs / f"nnUNetTrainerStudent__{STUDENT_PLANS}__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    assert (stored / checkpoint).read_bytes() == (online / checkpoint).read_bytes()
    prediction = Path("predictions") / "seed_0" / "nnUNetTrainerStudent" / "summary.json"
    assert (stored / prediction).read_text() == (online / prediction).read_text()
    # the machines that trained the copied run are named where it now is
    machines = {study: set((study / "machines.txt").read_text().splitlines()) for study in (online, stored)}
    assert machines[online] <= machines[stored]

    # paired by seed: seed 0 of both, seed 1 (online only) named as left out
    table = workspace.run("nnunet_kd", "study-compare", str(online), str(stored)).stdout
    assert f"teacher_targets None -> '{targets_3d.name}'" in table
    row = next(line for line in table.splitlines() if line.startswith("| nnUNetTrainerKDLogits | validation | 1 |"))
    assert "95 % CI" in table and row.count("|") == 11 and "no claim (1 seed)" in row
    assert "left out, their partner has no score yet: seed 1 of nnUNetTrainerKDLogits" in table
    mismatch = workspace.run("nnunet_kd", "study-compare", str(online), str(tmp_path), check=False)
    assert mismatch.returncode == 2 and "not a study folder" in mismatch.stderr

    # another schedule's plain runs are other runs: refused, and the new study folder is not even made
    other_schedule = _study(workspace, teacher_3d, tmp_path / "longer", "--epochs", "3", "--baseline-from",
                            str(stored), seeds=("0",), check=False)
    assert other_schedule.returncode == 2 and "num_epochs: 2 there, 3 here" in other_schedule.stderr
    assert not (tmp_path / "longer").exists()


def test_a_study_of_one_trainer_tests_the_teacher_as_its_targets_store_it_and_pairs_with_another(
        workspace, teacher_3d, stored_target_study, tmp_path):
    """KDLogits alone from an ensemble's targets (no plain runs: they would be the other study's), its teacher row the
    ensemble without mirroring, and `study-compare` pairing it with the fold-0 targets' study."""
    workspace.run("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher", teacher_3d.name,
                  "-f", "0", "1", "--disable_tta", "-device", "cpu")
    study = tmp_path / "study"
    stdout = _study(workspace, teacher_3d, study, "--teacher-targets", f"{teacher_3d.name}__f0-1__nomirror",
                    seeds=("0",), trainers=("nnUNetTrainerKDLogits",)).stdout
    assert "run 1 of 1" in stdout and "nnUNetTrainerStudent" not in stdout
    teacher = study / "predictions" / "teacher"
    assert json.loads((teacher / "teacher.json").read_text()) == {"folds": [0, 1], "mirroring": False}
    report = (study / "report.md").read_text()
    assert "folds 0, 1 (ensemble), without mirroring" in report
    assert "one trainer, `nnUNetTrainerKDLogits`, no baseline here" in report and "(baseline)" not in report
    assert "| nnUNetTrainerKDLogits | 1 |" in report and "KD against the baseline" not in report
    table = workspace.run("nnunet_kd", "study-compare", str(stored_target_study[0]), str(study)).stdout
    assert "teacher_targets" in table and "__f0-1__nomirror" in table
    assert "| nnUNetTrainerKDLogits | test | 1 |" in table
    # the same prediction as the stock command for that ensemble
    expected = tmp_path / "expected"
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(expected), "-d",
                  str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "1", "-tr", "nnUNetTrainer_debug", "-device", "cpu",
                  "--disable_tta", "-npp", "0", "-nps", "0")
    for case in sorted(expected.glob("*.nii.gz")):
        assert (teacher / case.name).read_bytes() == case.read_bytes()
