"""`nnunet_kd study-curve` on study folders laid out as `nnunet_kd study` and nnU-Net leave them (summary.json files,
checkpoints), one per student size, without training; and on their published copies."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_kd.tools.cli import main
from nnunet_kd.tools.study import STUDY_FILE, Run, StudyPlan, load_plan, save_or_check_plan
from nnunet_kd.tools.study_report import study_tables
from nnunet_kd.tools.study_stats import compare, crossed_interval, group_cases

BASELINE, KD = "nnUNetTrainerStudent", "nnUNetTrainerKDLogits"
CASES = [f"patient{i // 2:03d}_frame{i % 2:02d}" for i in range(8)]  # 4 patients x 2 frames, as ACDC
LABELS = {"background": 0, "RV": 1, "MYO": 2}


def _summary(path: Path, dice: np.ndarray) -> None:
    """nnU-Net's summary.json of cases x (RV, MYO) Dice, with the dataset.json nnUNetv2_predict writes beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per_case = [{"reference_file": f"/labels/{case}.nii.gz",
                 "metrics": {"1": {"Dice": float(row[0])}, "2": {"Dice": float(row[1])}}}
                for case, row in zip(CASES, dice)]
    path.write_text(json.dumps({"mean": {k: {"Dice": float(np.mean(dice[:, i]))} for i, k in enumerate("12")},
                                "metric_per_case": per_case}))
    (path.parent / "dataset.json").write_text(json.dumps({"labels": LABELS}))


def _weights(num: int) -> dict:
    return {"network_weights": {"conv.weight": torch.zeros(num - 3), "conv.bias": torch.zeros(3)},
            "logging": {"ema_fg_dice": [0.5, 0.8, 0.8]}}


def _dice(rng, level: float) -> np.ndarray:
    return np.clip(level + rng.normal(0, 0.03, (len(CASES), 2)), 0, 1)


def _make_study(root: Path, teacher: Path, parameters: int, levels: dict[str, float], seeds=(0, 1, 2)) -> Path:
    rng = np.random.default_rng(parameters)
    plan = StudyPlan(dataset="Dataset999_X", configuration="2d", plans=f"P_{parameters}", teacher=str(teacher),
                     trainers=tuple(levels), seeds=seeds, num_epochs=2, iterations_per_epoch=3,
                     test_images=str(root / "imagesTs"), test_labels=str(root / "labelsTs"))
    study = root / f"study_{parameters}"
    save_or_check_plan(plan, study)
    for trainer, level in levels.items():
        for seed in seeds:
            run = Run(seed, trainer, study, plan)
            run.fold_folder.mkdir(parents=True)
            torch.save(_weights(parameters), run.fold_folder / "checkpoint_final.pth")
            _summary(run.validation_summary, _dice(rng, level))
            _summary(run.test_predictions / "summary.json", _dice(rng, level + seed * 0.01))
    _summary(study / "predictions" / "teacher" / "summary.json", np.full((len(CASES), 2), 0.9))
    (study / "predictions" / "teacher" / "teacher.json").write_text(json.dumps({"folds": [0, 1, 2, 3, 4],
                                                                                "mirroring": True}))
    return study


@pytest.fixture
def two_sizes(tmp_path) -> tuple[Path, Path]:
    teacher = tmp_path / "results" / "Dataset999_X" / "nnUNetTrainer__nnUNetPlans__2d"
    teacher.mkdir(parents=True)
    (teacher / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    (teacher / "fold_0").mkdir()
    torch.save(_weights(5000), teacher / "fold_0" / "checkpoint_final.pth")
    _summary(teacher / "fold_0" / "validation" / "summary.json", np.full((len(CASES), 2), 0.88))
    small = _make_study(tmp_path, teacher, 100, {BASELINE: 0.6, KD: 0.7})
    large = _make_study(tmp_path, teacher, 1000, {BASELINE: 0.85, KD: 0.86})
    return small, large


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(row["study"], row["model"]): row for row in csv.DictReader(f)}


def _test_dice(study: Path, trainer: str, class_index: int | None = None) -> np.ndarray:
    out = []
    for seed in (0, 1, 2):
        summary = json.loads((study / "predictions" / f"seed_{seed}" / trainer / "summary.json").read_text())
        per_case = [[c["metrics"][k]["Dice"] for k in "12"] for c in summary["metric_per_case"]]
        out.append(np.mean(per_case, axis=1) if class_index is None else np.array(per_case)[:, class_index])
    return np.array(out)


def test_curve_gives_each_size_and_trainer_its_dice_interval_and_paired_difference(two_sizes, tmp_path, capsys):
    small, large = two_sizes
    main(["study-curve", str(small), str(large), "-o", str(tmp_path / "curve"), "--class", "MYO"])
    rows = _rows(tmp_path / "curve" / "curve.csv")
    assert set(rows) == {(s.name, t) for s in (small, large) for t in (BASELINE, KD)}
    for study, parameters in ((small, 100), (large, 1000)):
        kd, base = _test_dice(study, KD), _test_dice(study, BASELINE)
        row = rows[study.name, KD]
        assert int(row["parameters"]) == parameters and int(row["seeds"]) == 3
        assert float(row["dice"]) == pytest.approx(kd.mean(), abs=1e-6)
        assert (float(row["dice_low"]), float(row["dice_high"])) == pytest.approx(crossed_interval(kd), abs=1e-6)
        assert float(row["class_dice"]) == pytest.approx(_test_dice(study, KD, 1).mean(), abs=1e-6)
        paired = compare(kd, base)
        assert float(row["delta"]) == pytest.approx(paired.mean_difference, abs=1e-6)
        assert (float(row["delta_low"]), float(row["delta_high"])) == pytest.approx(paired.ci, abs=1e-6)
        assert row["claim"] == "no claim (3 seeds)"
        assert rows[study.name, BASELINE]["delta"] == ""  # the baseline has nothing to be paired with
    markdown = (tmp_path / "curve" / "curve.md").read_text()
    assert "teacher, 5-fold ensemble, mirrored: mean Dice 0.900, MYO 0.900 (5,000 parameters per network)" in markdown
    assert markdown.index("| study_100 |") < markdown.index("| study_1000 |")  # smallest first
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 10_000
    assert "written:" in capsys.readouterr().out


def test_curve_from_published_copies_is_the_curve_of_the_study_folders(two_sizes, tmp_path):
    small, large = two_sizes
    published = []
    for study in two_sizes:
        main(["study-report", str(study), "--publish", str(tmp_path / "published" / study.name)])
        published.append(tmp_path / "published" / study.name)
    assert json.loads((published[0] / "models.json").read_text())["parameters"] == {
        "teacher": 5000, BASELINE: 100, KD: 100}
    main(["study-curve", str(small), str(large), "-o", str(tmp_path / "from_folders")])
    main(["study-curve", *map(str, published), "-o", str(tmp_path / "from_copies")])
    folders, copies = _rows(tmp_path / "from_folders" / "curve.csv"), _rows(tmp_path / "from_copies" / "curve.csv")
    assert folders.keys() == copies.keys()
    for key, row in folders.items():  # the copy's Dice are rounded to 6 digits
        for column, value in row.items():
            try:
                assert float(copies[key][column]) == pytest.approx(float(value), abs=1e-5), (key, column)
            except ValueError:
                assert copies[key][column] == value


def test_curve_draws_other_models_as_lines_and_refuses_what_it_cannot_draw(two_sizes, tmp_path, capsys):
    small, large = two_sizes
    fold0 = tmp_path / "fold0_predictions" / "summary.json"
    _summary(fold0, np.full((len(CASES), 2), 0.8))
    main(["study-curve", str(small), str(large), "-o", str(tmp_path / "curve"), "--line", f"teacher fold 0={fold0}"])
    assert "- teacher fold 0: mean Dice 0.800" in (tmp_path / "curve" / "curve.md").read_text()

    for args, message in ((["--class", "LV"], "--class LV: study_100 has the classes ['RV', 'MYO']"),
                          (["--line", "no summary"], "--line no summary: give NAME=SUMMARY_JSON")):
        assert main(["study-curve", str(small), "-o", str(tmp_path / "refused"), *args]) == 2
        assert message in capsys.readouterr().err
    # a copy published before the sizes were: the fix is named
    main(["study-report", str(small), "--publish", str(tmp_path / "old_copy")])
    (tmp_path / "old_copy" / "models.json").unlink()
    assert main(["study-curve", str(tmp_path / "old_copy"), "-o", str(tmp_path / "refused")]) == 2
    assert "has no models.json" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_cases_of_one_patient_are_averaged_before_the_interval_counts_them(two_sizes, tmp_path):
    matrix = np.arange(16, dtype=float).reshape(2, 8)
    assert group_cases(matrix, CASES, r"(patient\d+)_").tolist() == [[0.5, 2.5, 4.5, 6.5], [8.5, 10.5, 12.5, 14.5]]
    small, large = two_sizes
    main(["study-curve", str(small), str(large), "-o", str(tmp_path / "curve"), "--group-pattern", r"(patient\d+)_"])
    row = _rows(tmp_path / "curve" / "curve.csv")[small.name, KD]
    kd, base = (group_cases(_test_dice(small, t), CASES, r"(patient\d+)_") for t in (KD, BASELINE))
    assert kd.shape == (3, 4)
    assert (float(row["dice_low"]), float(row["dice_high"])) == pytest.approx(crossed_interval(kd), abs=1e-6)
    assert (float(row["delta_low"]), float(row["delta_high"])) == pytest.approx(compare(kd, base).ci, abs=1e-6)
    assert "case groups (`(patient\\d+)_`" in (tmp_path / "curve" / "curve.md").read_text()
    assert main(["study-curve", str(small), "-o", str(tmp_path / "bad"), "--group-pattern", "(case\\d+)"]) == 2


def test_a_study_that_groups_its_cases_reports_compares_and_draws_per_patient(two_sizes, tmp_path, capsys):
    small, large = two_sizes
    pattern = r"(patient\d+)_"
    kd, base = (group_cases(_test_dice(small, t), CASES, pattern) for t in (KD, BASELINE))
    # the user's path: the report re-made with the grouping, which the study records for every later command
    teacher = load_plan(small).teacher
    assert main(["study", "Dataset999_X", "-c", "2d", "-p", "P_100", "--teacher", teacher, "--trainers", BASELINE,
                 KD, "--seeds", "0", "1", "2", "--epochs", "2", "--iterations", "3", "--device", "cpu",
                 "--test-images", str(tmp_path / "imagesTs"), "--test-labels", str(tmp_path / "labelsTs"),
                 "--group-pattern", pattern, "--time-cases", "0", "--report-only", "-o", str(small)]) in (0, None)
    assert load_plan(small).group_pattern == pattern
    tables = study_tables(small)
    grouped = compare(kd, base)
    assert f"| {KD} | 3 | {grouped.mean_difference:+.4f} | {grouped.interval_text()} |" in tables
    assert "the 8 cases are 4 patients" in tables
    assert f"{grouped.wins} / {grouped.losses} / {grouped.ties} |" in tables
    assert grouped.wins + grouped.losses + grouped.ties == 3 * 4  # (seed, patient) pairs
    ungrouped = compare(_test_dice(small, KD), _test_dice(small, BASELINE))
    assert grouped.ci != pytest.approx(ungrouped.ci)  # the frames of one patient no longer count twice

    # the published copy keeps the grouping; study-compare of two grouped studies pairs patients
    main(["study-report", str(small), "--publish", str(tmp_path / "published")])
    assert study_tables(tmp_path / "published") == tables
    capsys.readouterr()
    main(["study-compare", str(small), str(tmp_path / "published")])
    out = capsys.readouterr().out
    assert "| test | 3 | " in out and "4 patients" in out

    # the curve takes the studies' own grouping, and refuses studies grouped differently
    main(["study-curve", str(small), "-o", str(tmp_path / "curve")])
    row = _rows(tmp_path / "curve" / "curve.csv")[small.name, KD]
    assert (float(row["delta_low"]), float(row["delta_high"])) == pytest.approx(grouped.ci, abs=1e-6)
    assert main(["study-curve", str(small), str(large), "-o", str(tmp_path / "refused")]) == 2
    assert "group their cases differently" in capsys.readouterr().err
    assert main(["study-compare", str(small), str(large)]) == 2
    # a pattern that names no patient in a case is refused before anything runs or is recorded
    recorded = (small / STUDY_FILE).read_text()
    (tmp_path / "labelsTs").mkdir()
    (tmp_path / "labelsTs" / "case_007.nii.gz").touch()
    assert main(["study", "Dataset999_X", "-c", "2d", "-p", "P_100", "--teacher", teacher, "--seeds", "0",
                 "--test-images", str(tmp_path / "imagesTs"), "--test-labels", str(tmp_path / "labelsTs"),
                 "--group-pattern", pattern, "--report-only", "-o", str(small)]) == 2
    assert "does not match cases ['case_007.nii.gz']" in capsys.readouterr().err
    assert (small / STUDY_FILE).read_text() == recorded


def test_on_the_validation_fold_the_teacher_line_is_that_fold_and_other_cases_are_refused(two_sizes, tmp_path,
                                                                                           capsys):
    small, large = two_sizes
    main(["study-curve", str(small), "-o", str(tmp_path / "validation"), "--split", "validation"])
    markdown = (tmp_path / "validation" / "curve.md").read_text()
    assert "## Dice against student size, validation (fold 0)" in markdown
    assert "- teacher, fold 0: mean Dice 0.880" in markdown and "ensemble" not in markdown
    other = tmp_path / "other" / "summary.json"
    _summary(other, np.full((len(CASES), 2), 0.8))
    summary = json.loads(other.read_text())
    summary["metric_per_case"] = summary["metric_per_case"][:-1]
    other.write_text(json.dumps(summary))
    assert main(["study-curve", str(small), "-o", str(tmp_path / "refused"), "--line", f"x={other}"]) == 2
    assert "scored on 7 other cases than the studies' 8 test cases" in capsys.readouterr().err
