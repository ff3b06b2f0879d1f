"""Report arithmetic: the share of the teacher-student gap that KD closed, and class names from dataset.json."""
from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_kd.tools.bench import _gap_closed, _summary_dice


def _row(trainer: str, plans: str, mean: float, teacher_folder: str | None = None) -> dict:
    kd = {"teacher": {"model_folder": f"/results/D/{teacher_folder}"}} if teacher_folder else None
    return {"model": Path(f"/results/D/{trainer}__{plans}__3d_fullres"), "trainer": trainer, "plans": plans,
            "configuration": "3d_fullres", "fold": "0", "mean_dice": mean, "kd": kd}


TEACHER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def test_gap_closed_is_kd_gain_over_the_teacher_student_gap():
    rows = [_row("nnUNetTrainer", "nnUNetPlans", 0.9), _row("nnUNetTrainerStudent", "S", 0.7),
            _row("nnUNetTrainerKDLogits", "S", 0.75, TEACHER)]
    assert _gap_closed(rows[2], rows) == pytest.approx(0.25)
    assert _gap_closed(rows[0], rows) is None  # not a KD student


def test_gap_closed_compares_with_the_plain_student_of_the_same_schedule_only():
    rows = [_row("nnUNetTrainer", "nnUNetPlans", 0.9), _row("nnUNetTrainerStudent", "S", 0.5),
            _row("nnUNetTrainerStudent_demo", "S", 0.7), _row("nnUNetTrainerKDLogits_demo", "S", 0.8, TEACHER),
            _row("nnUNetTrainerKDLogits_T4_demo", "S", 0.75, TEACHER), _row("nnUNetTrainerKDLogits_debug", "S", 0.8,
                                                                              TEACHER)]
    assert _gap_closed(rows[3], rows) == pytest.approx(0.5)
    assert _gap_closed(rows[4], rows) == pytest.approx(0.25)  # a variant (_T4) of the demo schedule
    assert _gap_closed(rows[5], rows) is None  # no plain student with the debug schedule: no comparison


@pytest.mark.parametrize("plain_mean", [0.9, 0.95])
def test_no_gap_no_share(plain_mean):
    rows = [_row("nnUNetTrainer", "nnUNetPlans", 0.9), _row("nnUNetTrainerStudent", "S", plain_mean),
            _row("nnUNetTrainerKDLogits", "S", 0.92, TEACHER)]
    assert _gap_closed(rows[2], rows) is None


def test_missing_teacher_or_twin_gives_none():
    rows = [_row("nnUNetTrainerKDLogits", "S", 0.8, TEACHER)]
    assert _gap_closed(rows[0], rows) is None


def test_summary_classes_are_named_from_dataset_json():
    summary = {"mean": {"1": {"Dice": 0.9}, "2": {"Dice": 0.5}}, "foreground_mean": {"Dice": 0.7}}
    per_class, mean, hd95 = _summary_dice(summary, {"background": 0, "organ": 1, "lesion": 2})
    assert per_class == {"organ": 0.9, "lesion": 0.5} and mean == 0.7 and hd95 is None
    regions = {"mean": {"(1, 2)": {"Dice": 0.8, "HD95": 3.0}}, "foreground_mean": {"Dice": 0.8}}
    assert _summary_dice(regions, {"background": 0, "whole": [1, 2]}) == ({"whole": 0.8}, 0.8, 3.0)
