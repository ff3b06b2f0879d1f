"""`nnunet_kd study` through the real nnU-Net CLI: 2 seeds x (plain student, KD student), a tiny schedule, CPU."""
import json

from conftest import DATASET_ID, STUDENT_PLANS

from nnunet_kd.core.checkpoints import load_checkpoint


def _study(workspace, teacher_3d, output, *extra):
    return workspace.run(
        "nnunet_kd", "study", str(DATASET_ID), "-c", "3d_fullres", "-p", STUDENT_PLANS, "--teacher", teacher_3d.name,
        "--trainers", "nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "--seeds", "0", "1",
        "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--device", "cpu", "--time-cases", "1",
        "--test-images", str(workspace.raw / "imagesTs"), "--test-labels", str(workspace.raw / "labelsTs"),
        "-o", str(output), *extra)


def test_study_trains_paired_seeds_reports_and_resumes(workspace, teacher_3d, tmp_path):
    output = tmp_path / "study"
    first = _study(workspace, teacher_3d, output, "--jobs", "2")  # two runs at once
    assert "run 4 of 4" in first.stdout

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
    again = _study(workspace, teacher_3d, output, "--time-cases", "0")
    assert again.stdout.count(": done") == 4 and "training" not in again.stdout
    assert stamps == {k: (v / "checkpoint_final.pth").stat().st_mtime for k, v in runs.items()}


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
