"""The study report on a study folder laid out as `nnunet_kd study` and nnU-Net leave it (summary.json files and
checkpoints with nnU-Net's logging), without training: pairing by seed, and recomputing tables from published CSVs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_kd.tools.cli import main
from nnunet_kd.tools.study import STUDY_FILE, Run, StudyPlan, save_or_check_plan
from nnunet_kd.tools.study_report import collect, comparisons, study_tables

BASELINE, KD = "nnUNetTrainerStudent", "nnUNetTrainerKDLogits"
CASES = [f"case_{i:02d}" for i in range(6)]


def _summary(path: Path, dice: list[float], folder: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    per_case = [{"reference_file": f"/{folder}/{case}.nii.gz", "metrics": {"1": {"Dice": d}}}
                for case, d in zip(CASES, dice)]
    path.write_text(json.dumps({"mean": {"1": {"Dice": float(np.mean(dice))}}, "metric_per_case": per_case}))


def _make_study(root: Path, dice: dict[tuple[str, int], float], tested: set[tuple[str, int]]) -> tuple[StudyPlan, Path]:
    """A study of seeds 0 and 1 whose runs have Dice `dice[(trainer, seed)] + 0.01 * case` on every case; runs in
    `tested` also have test-set scores (0.1 lower)."""
    teacher = root / "results" / "Dataset999_X" / "nnUNetTrainer__nnUNetPlans__2d"
    (teacher / "dataset.json").parent.mkdir(parents=True)
    (teacher / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "structure": 1}}))
    _summary(teacher / "fold_0" / "validation" / "summary.json", [0.9] * 6, "val")
    torch.save({"network_weights": {"w": torch.zeros(40)}}, teacher / "fold_0" / "checkpoint_final.pth")
    plan = StudyPlan(dataset="Dataset999_X", configuration="2d", plans="P", teacher=str(teacher),
                     trainers=(BASELINE, KD), seeds=(0, 1), num_epochs=2, iterations_per_epoch=3,
                     test_images=str(root / "imagesTs"), test_labels=str(root / "labelsTs"))
    study = root / "study"
    save_or_check_plan(plan, study)
    for (trainer, seed), value in dice.items():
        run = Run(seed, trainer, study, plan)
        run.fold_folder.mkdir(parents=True)
        torch.save({"network_weights": {"w": torch.zeros(10)}, "logging": {"ema_fg_dice": [0.5, 0.8, 0.8]}},
                   run.fold_folder / "checkpoint_final.pth")
        _summary(run.validation_summary, [value + 0.01 * i for i in range(6)], "val")
        if (trainer, seed) in tested:
            _summary(run.test_predictions / "summary.json", [value - 0.1 + 0.01 * i for i in range(6)], "test")
    _summary(study / "predictions" / "teacher" / "summary.json", [0.85] * 6, "test")
    return plan, study


def test_test_scores_are_paired_by_seed_when_a_kd_run_is_not_tested_yet(tmp_path):
    # KD seed 0 trained but not tested: its seed 1 test scores must meet the baseline's seed 1, not seed 0
    dice = {(BASELINE, 0): 0.50, (BASELINE, 1): 0.70, (KD, 0): 0.55, (KD, 1): 0.72}
    plan, study = _make_study(tmp_path, dice, tested={(BASELINE, 0), (BASELINE, 1), (KD, 1)})
    results, teacher, _ = collect(plan, study)
    test = comparisons(results, teacher, BASELINE)["test"][KD]
    assert test.seeds == [1]
    assert test.result.mean_difference == pytest.approx(0.02)  # was 0.72 - 0.50 = +0.22 with seed 0's baseline
    assert test.unpaired == [f"seed 0 of {BASELINE}"]
    validation = comparisons(results, teacher, BASELINE)["validation"][KD]
    assert validation.seeds == [0, 1] and validation.result.per_seed_difference == pytest.approx((0.05, 0.02))
    tables = study_tables(study)
    assert f"left out, their partner has no test score yet: seed 0 of {BASELINE}" in tables
    assert "| n/a (one seed) |" in tables and "no claim (1 seed)" in tables
    assert "wide by necessity" in tables  # 2 seeds on the validation fold


def test_published_csv_recomputes_the_tables_and_the_comparison(tmp_path, capsys):
    dice = {(BASELINE, 0): 0.50, (BASELINE, 1): 0.70, (KD, 0): 0.55, (KD, 1): 0.72}
    _, study = _make_study(tmp_path, dice, tested=set(dice))
    tables = study_tables(study)
    published = tmp_path / "published"
    assert main(["study-report", str(study), "--publish", str(published)]) in (0, None)
    assert sorted(p.name for p in published.iterdir()) == ["models.json", "per_case_dice.csv", STUDY_FILE, "tables.md"]
    assert json.loads((published / "models.json").read_text()) == {
        "parameters": {"teacher": 40, BASELINE: 10, KD: 10}, "teacher_as_learned": None}
    assert (published / "tables.md").read_text() == tables == study_tables(published)
    capsys.readouterr()
    assert main(["study-report", str(published)]) in (0, None)
    assert capsys.readouterr().out == tables
    assert "| nnUNetTrainerKDLogits | 2 | +0.0350 | [" in tables
    # study-compare accepts published copies: the same study against itself differs by nothing
    main(["study-compare", str(published), str(study)])
    assert "| nnUNetTrainerKDLogits | validation | 2 | 0.660 | 0.660 | +0.0000 |" in capsys.readouterr().out


def test_study_report_of_a_folder_without_a_study_says_what_to_give(tmp_path, capsys):
    (tmp_path / STUDY_FILE).write_text(json.dumps(StudyPlan(
        dataset="D", configuration="2d", plans="P", teacher="/t", trainers=(BASELINE, KD), seeds=(0,)).to_json()))
    assert main(["study-report", str(tmp_path)]) == 2
    assert "holds neither a study's runs nor its per_case_dice.csv" in capsys.readouterr().err
