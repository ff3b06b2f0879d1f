"""Report arithmetic: the share of the teacher-student gap that KD closed, and nnU-Net's summary.json read with
class names from dataset.json; bench predict's flag variants."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.tools.bench_predict import parse_variants, split_folds
from nnunet_kd.tools.results import _gap_closed, read_summary


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


def _summary(tmp_path, per_case: dict[str, dict[str, float]]) -> Path:
    """A summary.json as nnU-Net writes it: per case its metrics per label (or region), and the means."""
    keys = list(next(iter(per_case.values())))
    means = {k: {"Dice": float(np.nanmean([case[k] for case in per_case.values()]))} for k in keys}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({
        "metric_per_case": [{"reference_file": f"/labels/{name}.nii.gz", "prediction_file": f"/out/{name}.nii.gz",
                             "metrics": {k: {"Dice": d} for k, d in case.items()}} for name, case in per_case.items()],
        "mean": means, "foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in means.values()]))}}))
    return path


def test_summary_classes_are_named_from_dataset_json_and_means_are_nnunets(tmp_path):
    path = _summary(tmp_path, {"b": {"1": 0.8, "2": float("nan")}, "a": {"1": 1.0, "2": 0.5}})
    scores = read_summary(path, {"background": 0, "organ": 1, "lesion": 2})
    assert scores.cases == ["a", "b"] and scores.classes == ["organ", "lesion"]
    summary = json.loads(path.read_text())
    assert scores.class_means == {"organ": pytest.approx(0.9), "lesion": pytest.approx(0.5)}
    assert scores.foreground_mean == pytest.approx(summary["foreground_mean"]["Dice"])  # nnU-Net's own figure
    regions = read_summary(_summary(tmp_path, {"a": {"(1, 2)": 0.8}}), {"background": 0, "whole": [1, 2]})
    assert regions.class_means == {"whole": pytest.approx(0.8)}


def test_prediction_variants_are_split_at_semicolons_and_defaults_means_no_flags():
    assert parse_variants("defaults; --disable_tta; ;-npp 1 -nps 1 ") == ["", "--disable_tta", "-npp 1 -nps 1"]


def test_a_model_of_bench_predict_may_carry_its_own_folds():
    assert split_folds("-f 0 1 2 3 4", ("0",)) == (("0", "1", "2", "3", "4"), "")
    assert split_folds("--disable_tta -f 0 1 -step_size 0.75", ("0",)) == (("0", "1"), "--disable_tta -step_size 0.75")
    assert split_folds("--runtime openvino", ("0",)) == (("0",), "--runtime openvino")
    with pytest.raises(KDConfigurationError, match="-f needs the model's folds"):
        split_folds("-f --disable_tta", ("0",))
