"""Unit tests for finding, checking and running the frozen teacher (no trained model, no GPU).

Plans are checked with nnU-Net's real PlansManager / ConfigurationManager built from a plans dict modelled on an
nnU-Net 2.8 `nnUNetPlans.json`; networks are small real dynamic_network_architectures U-Nets.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from realistic_plans import DATASET, _dataset_json, _realistic_plans
from torch import nn

from nnunet_kd.core.checkpoints import file_sha256
from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.students.plans import make_student_plans
from nnunet_kd.teachers.frozen import (
    FrozenTeacher,
    TeacherSpec,
    check_teacher_files,
    compatibility_problems,
    required_divisor,
    resolve_teacher_spec,
)

RESULTS = "/data/nnUNet_results"


# ---------------------------------------------------------------- fixtures

def _region_dataset_json() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": [1, 2], "tumor": [2]},
            "regions_class_order": [1, 2], "numTraining": 12, "file_ending": ".nii.gz"}


@pytest.fixture
def plans() -> dict:
    return _realistic_plans()


@pytest.fixture
def dataset_json() -> dict:
    return _dataset_json()


def _problems(teacher_plans: dict, teacher_configuration: str, teacher_dataset_json: dict, student_plans: dict,
              student_configuration: str, student_dataset_json: dict, **kwargs) -> list[str]:
    teacher, student = PlansManager(teacher_plans), PlansManager(student_plans)
    return compatibility_problems(teacher, teacher.get_configuration(teacher_configuration), teacher_dataset_json,
                                  student, student.get_configuration(student_configuration), student_dataset_json,
                                  **kwargs)


def _tiny_unet(seed: int, deep_supervision: bool = False) -> nn.Module:
    """3 stages, strides 1, 2, 2: inputs must be multiples of 4 per axis."""
    torch.manual_seed(seed)
    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision).eval()


def _model_folder(root, folds=(0,), checkpoints=("checkpoint_final.pth",)):
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir()
    (folder / "plans.json").write_text("{}")
    (folder / "dataset.json").write_text("{}")
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        for name in checkpoints:
            (folder / f"fold_{fold}" / name).write_bytes(b"")
    return folder


# ---------------------------------------------------------------- resolve_teacher_spec

def test_resolve_teacher_spec_defaults_to_stock_model_of_same_configuration_and_fold() -> None:
    spec = resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 3, environ={})
    assert spec.model_folder == os.path.abspath(
        os.path.join(RESULTS, DATASET, "nnUNetTrainer__nnUNetPlans__3d_fullres"))
    assert spec.folds == (3,)
    assert spec.checkpoint_name == "checkpoint_final.pth"
    assert spec.checkpoint_paths() == [Path(spec.model_folder) / "fold_3" / "checkpoint_final.pth"]


def test_resolve_teacher_spec_keeps_fold_all() -> None:
    assert resolve_teacher_spec(RESULTS, DATASET, "2d", "all", environ={}).folds == ("all",)


def test_resolve_teacher_spec_relative_name_is_under_results_dataset_folder() -> None:
    name = "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres"
    spec = resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 0, environ={"nnUNet_KD_teacher": name})
    assert spec.model_folder == os.path.abspath(os.path.join(RESULTS, DATASET, name))


def test_resolve_teacher_spec_absolute_folder_is_used_as_is_even_without_results(tmp_path) -> None:
    spec = resolve_teacher_spec(None, DATASET, "3d_fullres", 0, environ={"nnUNet_KD_teacher": str(tmp_path)})
    assert spec.model_folder == str(tmp_path)


@pytest.mark.parametrize(("text", "folds"), [("0,1,2", (0, 1, 2)), ("0 1", (0, 1)), (" 4 ", (4,)),
                                             ("all", ("all",)), ("0, 1,", (0, 1))])
def test_resolve_teacher_spec_parses_folds_from_environment(text, folds) -> None:
    spec = resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 0, environ={"nnUNet_KD_teacher_folds": text})
    assert spec.folds == folds


def test_resolve_teacher_spec_checkpoint_name_from_environment() -> None:
    environ = {"nnUNet_KD_teacher_checkpoint": "checkpoint_best.pth"}
    spec = resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 1, environ=environ)
    assert spec.checkpoint_name == "checkpoint_best.pth"
    assert spec.checkpoint_paths()[0].name == "checkpoint_best.pth"


def test_resolve_teacher_spec_ignores_empty_environment_values() -> None:
    environ = {"nnUNet_KD_teacher": "", "nnUNet_KD_teacher_folds": "", "nnUNet_KD_teacher_checkpoint": ""}
    assert resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 2, environ) == \
        resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 2, environ={})


@pytest.mark.parametrize("text", [",", " , ,"])
def test_resolve_teacher_spec_rejects_folds_naming_no_fold(text) -> None:
    with pytest.raises(KDConfigurationError, match="nnUNet_KD_teacher_folds"):
        resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 0, environ={"nnUNet_KD_teacher_folds": text})


@pytest.mark.parametrize("text", ["first", "0;1", "ALL"])
def test_resolve_teacher_spec_rejects_non_integer_folds_with_configuration_error(text) -> None:
    with pytest.raises(KDConfigurationError, match="nnUNet_KD_teacher_folds"):
        resolve_teacher_spec(RESULTS, DATASET, "3d_fullres", 0, environ={"nnUNet_KD_teacher_folds": text})


@pytest.mark.parametrize("environ", [{}, {"nnUNet_KD_teacher": "nnUNetTrainer__nnUNetPlans__2d"}])
def test_resolve_teacher_spec_needs_results_folder_for_relative_names(environ) -> None:
    with pytest.raises(KDConfigurationError, match="nnUNet_results"):
        resolve_teacher_spec(None, DATASET, "3d_fullres", 0, environ=environ)


def test_teacher_spec_to_json_round_trips() -> None:
    spec = TeacherSpec("/m", (0, "all"), "checkpoint_final.pth")
    assert TeacherSpec(**{**spec.to_json(), "folds": tuple(spec.to_json()["folds"])}) == spec


# ---------------------------------------------------------------- check_teacher_files

def test_check_teacher_files_accepts_complete_folder(tmp_path) -> None:
    folder = _model_folder(tmp_path, folds=(0, 1, 2))
    check_teacher_files(TeacherSpec(str(folder), (0, 1, 2), "checkpoint_final.pth"), DATASET, "3d_fullres")


def test_check_teacher_files_reports_missing_folder_and_how_to_train(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(KDConfigurationError) as info:
        check_teacher_files(TeacherSpec(str(missing), (0,), "checkpoint_final.pth"), DATASET, "3d_fullres")
    assert str(missing) in str(info.value)
    assert f"nnUNetv2_train {DATASET} 3d_fullres" in str(info.value)


@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_check_teacher_files_reports_missing_json(tmp_path, name) -> None:
    folder = _model_folder(tmp_path)
    (folder / name).unlink()
    with pytest.raises(KDConfigurationError, match=f"has no {name}"):
        check_teacher_files(TeacherSpec(str(folder), (0,), "checkpoint_final.pth"), DATASET, "3d_fullres")


def test_check_teacher_files_reports_missing_fold_and_lists_available(tmp_path) -> None:
    folder = _model_folder(tmp_path, folds=(0, 1))
    with pytest.raises(KDConfigurationError) as info:
        check_teacher_files(TeacherSpec(str(folder), (0, 3), "checkpoint_final.pth"), DATASET, "3d_fullres")
    message = str(info.value)
    assert "fold_3 not found" in message
    assert "'fold_0'" in message and "'fold_1'" in message


def test_check_teacher_files_reports_no_folds_at_all(tmp_path) -> None:
    folder = _model_folder(tmp_path, folds=())
    with pytest.raises(KDConfigurationError, match="available: none"):
        check_teacher_files(TeacherSpec(str(folder), (0,), "checkpoint_final.pth"), DATASET, "3d_fullres")


def test_check_teacher_files_reports_missing_checkpoint_lists_present_ones_and_suggests_env(tmp_path) -> None:
    folder = _model_folder(tmp_path, checkpoints=("checkpoint_best.pth", "checkpoint_latest.pth"))
    with pytest.raises(KDConfigurationError) as info:
        check_teacher_files(TeacherSpec(str(folder), (0,), "checkpoint_final.pth"), DATASET, "3d_fullres")
    message = str(info.value)
    assert "checkpoint_final.pth not found" in message
    assert "'checkpoint_best.pth'" in message and "'checkpoint_latest.pth'" in message
    assert "nnUNet_KD_teacher_checkpoint=checkpoint_best.pth" in message


def test_check_teacher_files_checks_every_fold_of_an_ensemble(tmp_path) -> None:
    folder = _model_folder(tmp_path, folds=(0, 1))
    (folder / "fold_1" / "checkpoint_final.pth").unlink()
    with pytest.raises(KDConfigurationError, match="no checkpoints"):
        check_teacher_files(TeacherSpec(str(folder), (0, 1), "checkpoint_final.pth"), DATASET, "3d_fullres")


# ---------------------------------------------------------------- compatibility_problems

def test_compatibility_identical_teacher_and_student_has_no_problems(plans, dataset_json) -> None:
    assert _problems(plans, "3d_fullres", dataset_json, copy.deepcopy(plans), "3d_fullres",
                     copy.deepcopy(dataset_json)) == []


def _labels_renamed(p, d):
    d["labels"] = {"background": 0, "liver": 1, "lesion": 2}


def _labels_renumbered(p, d):
    d["labels"] = {"background": 0, "liver": 2, "tumor": 1}


def _channel_renamed(p, d):
    d["channel_names"] = {"0": "MR"}


def _channel_added(p, d):
    d["channel_names"] = {"0": "CT", "1": "CT"}


def _spacing_changed(p, d):
    p["configurations"]["3d_fullres"]["spacing"] = [2.5, 0.79, 0.79]


def _transposed(p, d):
    p["transpose_forward"], p["transpose_backward"] = [2, 0, 1], [1, 2, 0]


def _zscore(p, d):
    p["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]


def _mask_for_norm(p, d):
    p["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True]


def _ct_statistics(p, d):
    p["foreground_intensity_properties_per_channel"]["0"]["mean"] = 120.0


@pytest.mark.parametrize(("change", "expected"), [
    (_labels_renamed, "label/region definitions differ"),
    (_labels_renumbered, "label/region definitions differ"),
    (_channel_renamed, "input channels differ"),
    (_channel_added, "input channels differ"),
    (_spacing_changed, "target spacing differs"),
    (_transposed, "transpose_forward differs"),
    (_zscore, "normalisation schemes differ"),
    (_mask_for_norm, "use_mask_for_norm differs"),
    (_ct_statistics, "CT intensity statistics"),
])
def test_compatibility_reports_exactly_the_one_difference(plans, dataset_json, change, expected) -> None:
    teacher_plans, teacher_dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    change(teacher_plans, teacher_dataset_json)
    problems = _problems(teacher_plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", dataset_json)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_compatibility_reports_every_problem_not_only_the_first(plans, dataset_json) -> None:
    teacher_plans, teacher_dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    for change in (_labels_renamed, _spacing_changed, _transposed):
        change(teacher_plans, teacher_dataset_json)
    assert len(_problems(teacher_plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", dataset_json)) == 3


def test_compatibility_spacing_message_names_both_spacings(plans, dataset_json) -> None:
    problems = _problems(plans, "3d_lowres", dataset_json, plans, "3d_fullres", dataset_json)
    assert len(problems) == 1
    assert "[3.0, 1.6, 1.6]" in problems[0] and "[2.0, 0.79, 0.79]" in problems[0]


def test_compatibility_ignores_ct_statistics_without_ct_normalisation(plans, dataset_json) -> None:
    _zscore(plans, dataset_json)
    teacher_plans = copy.deepcopy(plans)
    _ct_statistics(teacher_plans, dataset_json)
    assert _problems(teacher_plans, "3d_fullres", dataset_json, plans, "3d_fullres", dataset_json) == []


def test_compatibility_reports_different_regions_class_order(plans) -> None:
    student_dataset_json, teacher_dataset_json = _region_dataset_json(), _region_dataset_json()
    teacher_dataset_json["regions_class_order"] = [2, 1]
    problems = _problems(plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", student_dataset_json)
    assert len(problems) == 1 and "regions_class_order" in problems[0]


def test_compatibility_treats_region_lists_and_tuples_alike(plans) -> None:
    teacher_dataset_json = _region_dataset_json()
    teacher_dataset_json["labels"] = {k: tuple(v) if isinstance(v, list) else v
                                      for k, v in teacher_dataset_json["labels"].items()}
    teacher_dataset_json["regions_class_order"] = (1, 2)
    assert _problems(plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", _region_dataset_json()) == []


def test_compatibility_reports_regions_in_another_channel_order(plans) -> None:
    student_dataset_json = {"channel_names": {"0": "MR"}, "numTraining": 12, "file_ending": ".nii.gz",
                            "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
                            "regions_class_order": [1, 2, 3]}
    teacher_dataset_json = copy.deepcopy(student_dataset_json)
    teacher_dataset_json["labels"] = {"background": 0, "core": [2, 3], "whole": [1, 2, 3], "enhancing": [3]}
    # the teacher's first output channel is 'core', the student's 'whole'
    teacher_regions = PlansManager(plans).get_label_manager(teacher_dataset_json).foreground_regions
    student_regions = PlansManager(plans).get_label_manager(student_dataset_json).foreground_regions
    assert teacher_regions != student_regions
    problems = _problems(plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", student_dataset_json)
    assert len(problems) == 1 and "label/region" in problems[0]


def test_compatibility_label_based_teacher_for_region_based_student_is_a_problem(plans, dataset_json) -> None:
    problems = _problems(plans, "3d_fullres", dataset_json, plans, "3d_fullres", _region_dataset_json())
    assert len(problems) == 1 and "label/region" in problems[0]


def test_compatibility_2d_teacher_for_3d_student_is_one_problem(plans, dataset_json) -> None:
    problems = _problems(plans, "2d", dataset_json, plans, "3d_fullres", dataset_json)
    assert len(problems) == 1, problems
    assert "2D model" in problems[0] and "3D" in problems[0]


def test_compatibility_2d_teacher_for_2d_student_is_fine(plans, dataset_json) -> None:
    assert _problems(plans, "2d", dataset_json, copy.deepcopy(plans), "2d", dataset_json) == []


def test_compatibility_allows_other_architecture_width_and_patch(plans, dataset_json) -> None:
    # ResEnc teacher (other class, blocks, patch, data_identifier) for a plain U-Net student on the same voxels
    assert _problems(plans, "3d_fullres_resenc", dataset_json, plans, "3d_fullres", dataset_json) == []
    student_plans = make_student_plans(plans, ["3d_fullres"], width=0.25, stages=3, convs=1)
    student_plans["configurations"]["3d_fullres"]["patch_size"] = [48, 64, 80]
    student_plans["configurations"]["3d_fullres"]["batch_size"] = 4
    assert _problems(plans, "3d_fullres", dataset_json, student_plans, "3d_fullres", dataset_json) == []


def test_compatibility_without_channel_check_skips_channel_and_normalisation_checks(plans, dataset_json) -> None:
    teacher_plans, teacher_dataset_json = copy.deepcopy(plans), copy.deepcopy(dataset_json)
    for change in (_channel_added, _zscore, _mask_for_norm, _ct_statistics):
        change(teacher_plans, teacher_dataset_json)
    assert len(_problems(teacher_plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", dataset_json)) == 4
    assert _problems(teacher_plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", dataset_json,
                     check_channels=False) == []
    # ... but not the label check
    _labels_renamed(teacher_plans, teacher_dataset_json)
    problems = _problems(teacher_plans, "3d_fullres", teacher_dataset_json, plans, "3d_fullres", dataset_json,
                         check_channels=False)
    assert len(problems) == 1 and "label/region" in problems[0]


# ---------------------------------------------------------------- required_divisor

def test_required_divisor_is_product_of_strides(plans) -> None:
    manager = PlansManager(plans)
    assert list(required_divisor(manager.get_configuration("3d_fullres"))) == [8, 8, 8]
    assert list(required_divisor(manager.get_configuration("2d"))) == [32, 32]


def test_required_divisor_per_axis_for_anisotropic_strides(plans) -> None:
    configuration = copy.deepcopy(plans["configurations"]["3d_fullres"])
    configuration["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
    np.testing.assert_array_equal(required_divisor(ConfigurationManager(configuration)), [2, 8, 8])


# ---------------------------------------------------------------- FrozenTeacher

def test_frozen_teacher_padding_for() -> None:
    teacher = FrozenTeacher([_tiny_unet(0)], np.array([4, 4, 4]))
    assert teacher.divisor == [4, 4, 4]
    assert teacher.padding_for((10, 13, 8)) == [2, 3, 0]
    assert FrozenTeacher([_tiny_unet(0)], [1, 4, 8]).padding_for((5, 6, 9)) == [0, 2, 7]


def test_frozen_teacher_output_equals_network_when_no_padding_needed() -> None:
    network = _tiny_unet(0)
    x = torch.randn(2, 1, 8, 12, 16)
    with torch.no_grad():
        expected = network(x)
    assert torch.allclose(FrozenTeacher([network], [4, 4, 4])(x), expected, atol=1e-6)


def test_frozen_teacher_pads_at_far_end_and_crops_logits_back() -> None:
    network = _tiny_unet(0)
    x = torch.randn(2, 1, 10, 13, 8)
    out = FrozenTeacher([network], [4, 4, 4])(x)
    assert out.shape == (2, 3, 10, 13, 8)
    padded = torch.zeros(2, 1, 12, 16, 8)
    padded[:, :, :10, :13, :8] = x
    with torch.no_grad():
        expected = network(padded)[:, :, :10, :13, :8]
    assert torch.allclose(out, expected, atol=1e-6)


def test_frozen_teacher_ensemble_averages_logits() -> None:
    first, second = _tiny_unet(0), _tiny_unet(1)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        a, b = first(x), second(x)
    assert not torch.allclose(a, b)
    assert torch.allclose(FrozenTeacher([first, second], [4, 4, 4])(x), (a + b) / 2, atol=1e-6)


def test_frozen_teacher_uses_full_resolution_output_of_deep_supervision_network() -> None:
    plain, supervised = _tiny_unet(0), _tiny_unet(1, deep_supervision=True)
    supervised.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert isinstance(supervised(x), (list, tuple))
        expected = plain(x)
    assert torch.allclose(FrozenTeacher([supervised], [4, 4, 4])(x), expected, atol=1e-6)


def test_frozen_teacher_parameters_are_frozen_and_output_has_no_graph() -> None:
    teacher = FrozenTeacher([_tiny_unet(0)], [4, 4, 4])
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    out = teacher(x)
    assert out.grad_fn is None and not out.requires_grad


def test_frozen_teacher_stays_in_eval_mode_when_asked_to_train() -> None:
    teacher = FrozenTeacher([_tiny_unet(0)], [4, 4, 4])
    assert teacher.train() is teacher
    assert not any(m.training for m in teacher.modules())
    # also when a parent module switches everything to training mode
    parent = nn.ModuleDict({"teacher": teacher, "student": nn.Conv3d(1, 1, 1)})
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in teacher.modules())


def test_frozen_teacher_output_is_float32() -> None:
    teacher = FrozenTeacher([_tiny_unet(0).double()], [4, 4, 4])
    assert teacher(torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)).dtype == torch.float32


# ---------------------------------------------------------------- file_sha256

def test_file_sha256_matches_hashlib_across_block_boundary(tmp_path) -> None:
    data = np.random.default_rng(0).bytes((1 << 20) * 2 + 12345)
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_file_sha256_of_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert file_sha256(path) == hashlib.sha256(b"").hexdigest()
