"""Unit tests for student plans: naming, architecture scaling, plans derivation, parameter counts, writing.

The input plans are a dict modelled on an nnU-Net 2.8 `nnUNetPlans.json`; nnU-Net's own PlansManager resolves them and
its get_network_from_plans builds the networks.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from realistic_plans import _dataset_json, _realistic_plans

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.students.plans import (
    count_parameters,
    make_student_plans,
    scale_architecture,
    student_plans_name,
    with_batch_size,
    write_plans,
)

# ---------------------------------------------------------------- fixtures

@pytest.fixture
def plans() -> dict:
    return _realistic_plans()


@pytest.fixture
def plain_kwargs(plans) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]


@pytest.fixture
def resenc_kwargs(plans) -> dict:
    return plans["configurations"]["3d_fullres_resenc"]["architecture"]["arch_kwargs"]


# ---------------------------------------------------------------- student_plans_name

@pytest.mark.parametrize(("args", "expected"), [
    (("nnUNetPlans", 0.5), "nnUNetPlans_KDStudent_w0.5"),
    (("nnUNetPlans", 1.0), "nnUNetPlans_KDStudent_w1"),
    (("nnUNetPlans", 0.25, 3), "nnUNetPlans_KDStudent_w0.25_s3"),
    (("nnUNetPlans", 0.25, None, 1), "nnUNetPlans_KDStudent_w0.25_c1"),
    (("nnUNetResEncUNetMPlans", 0.125, 4, 2), "nnUNetResEncUNetMPlans_KDStudent_w0.125_s4_c2"),
])
def test_student_plans_name(args, expected) -> None:
    assert student_plans_name(*args) == expected


# ---------------------------------------------------------------- scale_architecture

def test_scale_architecture_scales_and_rounds_widths(plain_kwargs) -> None:
    assert scale_architecture(plain_kwargs, 0.5)["features_per_stage"] == [16, 32, 64, 128]
    # 32 * 0.3 = 9.6, 64 * 0.3 = 19.2, 38.4, 76.8
    assert scale_architecture(plain_kwargs, 0.3)["features_per_stage"] == [10, 19, 38, 77]
    assert scale_architecture(plain_kwargs, 1.0) == plain_kwargs


def test_scale_architecture_floors_widths_at_min_features(plain_kwargs) -> None:
    # 32 * 0.1 = 3.2 -> 4 (default floor); 6.4 -> 6; 12.8 -> 13; 25.6 -> 26
    assert scale_architecture(plain_kwargs, 0.1)["features_per_stage"] == [4, 6, 13, 26]
    assert scale_architecture(plain_kwargs, 0.1, min_features=8)["features_per_stage"] == [8, 8, 13, 26]


def test_scale_architecture_expands_integer_features_per_stage(plain_kwargs) -> None:
    kwargs = {**plain_kwargs, "features_per_stage": 32}
    assert scale_architecture(kwargs, 0.25)["features_per_stage"] == [8, 8, 8, 8]
    assert scale_architecture(kwargs, 0.25, stages=2)["features_per_stage"] == [8, 8]


def test_scale_architecture_keeps_everything_but_widths_by_default(plain_kwargs) -> None:
    scaled = scale_architecture(plain_kwargs, 0.5)
    assert {k: v for k, v in scaled.items() if k != "features_per_stage"} == \
        {k: v for k, v in plain_kwargs.items() if k != "features_per_stage"}


def test_scale_architecture_drops_deepest_stages_from_every_per_stage_key(plain_kwargs) -> None:
    scaled = scale_architecture(plain_kwargs, 0.5, stages=3)
    assert scaled["n_stages"] == 3
    assert scaled["features_per_stage"] == [16, 32, 64]
    assert scaled["kernel_sizes"] == plain_kwargs["kernel_sizes"][:3]
    assert scaled["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert scaled["n_conv_per_stage"] == [2, 2, 2]
    assert scaled["n_conv_per_stage_decoder"] == [2, 2]


def test_scale_architecture_truncates_residual_blocks_per_stage(resenc_kwargs) -> None:
    scaled = scale_architecture(resenc_kwargs, 1.0, stages=2)
    assert scaled["n_blocks_per_stage"] == [1, 3]
    assert scaled["n_conv_per_stage_decoder"] == [1]
    assert "n_conv_per_stage" not in scaled


def test_scale_architecture_keeps_the_shallow_decoder_stages(plain_kwargs) -> None:
    # decoder stage s-1 of UNetDecoder joins encoder stages n-s and n-s-1: entry 0 belongs to the deepest join
    kwargs = {**plain_kwargs, "n_conv_per_stage_decoder": [3, 2, 1]}
    assert scale_architecture(kwargs, 1.0, stages=3)["n_conv_per_stage_decoder"] == [2, 1]


def test_scale_architecture_sets_convs_per_stage_in_encoder_and_decoder(plain_kwargs) -> None:
    scaled = scale_architecture(plain_kwargs, 1.0, convs=1)
    assert scaled["n_conv_per_stage"] == [1, 1, 1, 1]
    assert scaled["n_conv_per_stage_decoder"] == [1, 1, 1]
    scaled = scale_architecture(plain_kwargs, 1.0, stages=3, convs=3)
    assert scaled["n_conv_per_stage"] == [3, 3, 3]
    assert scaled["n_conv_per_stage_decoder"] == [3, 3]


def test_scale_architecture_sets_residual_blocks_per_stage(resenc_kwargs) -> None:
    scaled = scale_architecture(resenc_kwargs, 0.5, stages=3, convs=2)
    assert scaled["n_blocks_per_stage"] == [2, 2, 2]
    assert scaled["n_conv_per_stage_decoder"] == [2, 2]
    assert "n_conv_per_stage" not in scaled


def test_scale_architecture_does_not_mutate_its_input(plain_kwargs) -> None:
    before = copy.deepcopy(plain_kwargs)
    scale_architecture(plain_kwargs, 0.25, stages=2, convs=1)
    assert plain_kwargs == before


@pytest.mark.parametrize("width", [0.0, -0.5, 1.01, 2.0])
def test_scale_architecture_rejects_width_outside_zero_one(plain_kwargs, width) -> None:
    with pytest.raises(KDConfigurationError, match="--width"):
        scale_architecture(plain_kwargs, width)


@pytest.mark.parametrize("stages", [0, 1, 5])
def test_scale_architecture_rejects_stages_outside_two_to_n(plain_kwargs, stages) -> None:
    with pytest.raises(KDConfigurationError, match="--stages"):
        scale_architecture(plain_kwargs, 0.5, stages=stages)


@pytest.mark.parametrize("convs", [0, -1])
def test_scale_architecture_rejects_fewer_than_one_conv(plain_kwargs, convs) -> None:
    with pytest.raises(KDConfigurationError, match="--convs"):
        scale_architecture(plain_kwargs, 0.5, convs=convs)


# ---------------------------------------------------------------- make_student_plans

def test_make_student_plans_names_plans_and_keeps_the_data(plans) -> None:
    student = make_student_plans(plans, ["3d_fullres"], width=0.5)
    assert student["plans_name"] == "nnUNetPlans_KDStudent_w0.5"
    config, teacher_config = student["configurations"]["3d_fullres"], plans["configurations"]["3d_fullres"]
    for key in ("data_identifier", "patch_size", "spacing", "batch_size", "normalization_schemes", "use_mask_for_norm",
                "preprocessor_name", "resampling_fn_data_kwargs", "batch_dice"):
        assert config[key] == teacher_config[key], key
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    for key in ("dataset_name", "transpose_forward", "transpose_backward", "image_reader_writer", "label_manager",
                "foreground_intensity_properties_per_channel", "original_median_spacing_after_transp"):
        assert student[key] == plans[key], key


def test_make_student_plans_custom_name(plans) -> None:
    assert make_student_plans(plans, ["2d"], 0.5, name="Tiny")["plans_name"] == "Tiny"


def test_make_student_plans_keeps_only_requested_configurations(plans) -> None:
    student = make_student_plans(plans, ["2d", "3d_fullres"], width=0.25, stages=3, convs=1)
    assert list(student["configurations"]) == ["2d", "3d_fullres"]
    assert student["plans_name"] == "nnUNetPlans_KDStudent_w0.25_s3_c1"
    assert student["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] == 3
    assert student["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_conv_per_stage"] == [1, 1, 1]


def test_make_student_plans_resolves_inherited_configuration(plans) -> None:
    student = make_student_plans(plans, ["3d_lowres"], width=0.5)
    lowres = student["configurations"]["3d_lowres"]
    assert "inherits_from" not in lowres
    # its own values ...
    assert lowres["data_identifier"] == "nnUNetPlans_3d_lowres"
    assert lowres["spacing"] == [3.0, 1.6, 1.6]
    # ... and the parent's, which would otherwise be lost with 3d_fullres left out
    fullres = plans["configurations"]["3d_fullres"]
    assert lowres["patch_size"] == fullres["patch_size"]
    assert lowres["normalization_schemes"] == fullres["normalization_schemes"]
    assert lowres["architecture"]["network_class_name"] == fullres["architecture"]["network_class_name"]
    assert lowres["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128]
    config = PlansManager(student).get_configuration("3d_lowres")
    assert config.data_identifier == "nnUNetPlans_3d_lowres" and config.batch_size == 2


def test_make_student_plans_scales_residual_encoder_configuration(plans) -> None:
    student = make_student_plans(plans, ["3d_fullres_resenc"], width=0.5, stages=3, convs=1)
    arch = student["configurations"]["3d_fullres_resenc"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    assert arch["arch_kwargs"]["n_blocks_per_stage"] == [1, 1, 1]
    assert arch["arch_kwargs"]["features_per_stage"] == [16, 32, 64]


def test_make_student_plans_rejects_unknown_configuration(plans) -> None:
    with pytest.raises(KDConfigurationError, match="3d_cascade_fullres.*available"):
        make_student_plans(plans, ["3d_fullres", "3d_cascade_fullres"], width=0.5)


def test_make_student_plans_rejects_cascade_configurations(plans) -> None:
    # what nnU-Net's planner writes when it keeps 3d_lowres next to 3d_fullres
    plans["configurations"]["3d_lowres"]["next_stage"] = "3d_cascade_fullres"
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        with pytest.raises(KDConfigurationError, match="cascade"):
            make_student_plans(plans, [configuration], width=0.5)


def test_make_student_plans_does_not_mutate_input(plans) -> None:
    before = copy.deepcopy(plans)
    make_student_plans(plans, ["2d", "3d_fullres", "3d_lowres"], width=0.25, stages=2, convs=1)
    assert plans == before


def test_make_student_plans_result_is_json_serialisable(plans) -> None:
    student = make_student_plans(plans, ["3d_lowres"], width=0.5)
    assert json.loads(json.dumps(student)) == student


# ---------------------------------------------------------------- count_parameters

def _parameters_built_by_hand(plans: dict, configuration: str, num_classes: int) -> int:
    config = PlansManager(plans).get_configuration(configuration)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, num_classes,
                                     allow_init=False, deep_supervision=True)
    return sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres", "3d_lowres", "3d_fullres_resenc"])
def test_count_parameters_matches_network_built_from_plans(plans, configuration) -> None:
    count = count_parameters(plans, configuration, _dataset_json())
    assert count == _parameters_built_by_hand(plans, configuration, num_classes=3)
    assert count > 1_000_000


def test_count_parameters_student_is_smaller_than_teacher(plans) -> None:
    dataset_json = _dataset_json()
    teacher = count_parameters(plans, "3d_fullres", dataset_json)
    half = make_student_plans(plans, ["3d_fullres"], width=0.5)
    shallow = make_student_plans(plans, ["3d_fullres"], width=0.5, stages=3, convs=1)
    half_count = count_parameters(half, "3d_fullres", dataset_json)
    shallow_count = count_parameters(shallow, "3d_fullres", dataset_json)
    assert teacher > half_count > shallow_count
    # halving every width roughly quarters the convolution weights
    assert 0.2 < half_count / teacher < 0.3
    assert shallow_count == _parameters_built_by_hand(shallow, "3d_fullres", num_classes=3)


def test_count_parameters_counts_region_outputs(plans) -> None:
    regions = {**_dataset_json(), "labels": {"background": 0, "liver": [1, 2], "tumor": [2]},
               "regions_class_order": [1, 2]}
    # two region heads instead of three label heads: one output channel fewer in each 1x1x1 segmentation layer (nnU-Net
    # builds one per decoder stage, deep supervision or not), each with a weight per input feature and a bias
    assert count_parameters(plans, "3d_fullres", _dataset_json()) - count_parameters(plans, "3d_fullres", regions) \
        == sum(features + 1 for features in (32, 64, 128))


# ---------------------------------------------------------------- write_plans

def test_write_plans_writes_file_named_after_plans(tmp_path, plans) -> None:
    student = make_student_plans(plans, ["3d_fullres"], width=0.5)
    path, written = write_plans(student, tmp_path)
    assert written
    assert path == tmp_path / "nnUNetPlans_KDStudent_w0.5.json"
    assert json.loads(path.read_text()) == student
    assert PlansManager(str(path)).get_configuration("3d_fullres").data_identifier == "nnUNetPlans_3d_fullres"


def test_write_plans_leaves_identical_file_alone(tmp_path, plans) -> None:
    student = make_student_plans(plans, ["3d_fullres"], width=0.5)
    path, _ = write_plans(student, tmp_path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    path_again, written = write_plans(copy.deepcopy(student), tmp_path)
    assert (path_again, written) == (path, False)
    assert os.stat(path).st_mtime_ns == 1_000_000_000


def test_write_plans_adds_another_configuration_of_the_same_width(tmp_path, plans) -> None:
    """`student-plans -c 3d_fullres --width 0.5`, then `-c 2d --width 0.5`: one file, both configurations."""
    path, _ = write_plans(make_student_plans(plans, ["3d_fullres"], width=0.5), tmp_path)
    assert write_plans(make_student_plans(plans, ["2d"], width=0.5), tmp_path) == (path, True)
    both = json.loads(path.read_text())
    assert both == make_student_plans(plans, ["3d_fullres", "2d"], width=0.5)
    assert write_plans(make_student_plans(plans, ["2d"], width=0.5), tmp_path) == (path, False)
    with pytest.raises(KDConfigurationError, match=r"configuration\(s\) \['2d'\]"):
        write_plans(make_student_plans(plans, ["2d"], width=0.25, name="nnUNetPlans_KDStudent_w0.5"), tmp_path)
    assert json.loads(path.read_text()) == both


def test_write_plans_refuses_to_replace_different_file_without_force(tmp_path, plans) -> None:
    first = make_student_plans(plans, ["3d_fullres"], width=0.5, name="Student")
    second = make_student_plans(plans, ["3d_fullres"], width=0.25, name="Student")
    path, _ = write_plans(first, tmp_path)
    with pytest.raises(KDConfigurationError, match="--force"):
        write_plans(second, tmp_path)
    assert json.loads(path.read_text()) == first
    assert write_plans(second, tmp_path, force=True) == (path, True)
    assert json.loads(path.read_text()) == second


# ---------------------------------------------------------------- with_batch_size

def test_with_batch_size_changes_only_the_batch_of_the_named_configurations(plans) -> None:
    variant = with_batch_size(plans, ["3d_fullres"], 5)
    assert variant["plans_name"] == "nnUNetPlans_bs5"
    assert variant["configurations"]["3d_fullres"]["batch_size"] == 5
    assert variant["configurations"]["2d"] == plans["configurations"]["2d"]
    rest = {k: v for k, v in variant["configurations"]["3d_fullres"].items() if k != "batch_size"}
    assert rest == {k: v for k, v in plans["configurations"]["3d_fullres"].items() if k != "batch_size"}
    assert plans["configurations"]["3d_fullres"]["batch_size"] != 5  # the input is left alone


def test_with_batch_size_refuses_an_unknown_configuration_and_an_empty_batch(plans) -> None:
    with pytest.raises(KDConfigurationError, match="not in plans"):
        with_batch_size(plans, ["3d_cascade_fullres_x"], 2)
    with pytest.raises(KDConfigurationError, match="at least one"):
        with_batch_size(plans, ["3d_fullres"], 0)


def test_batch_plans_command_writes_the_variant_next_to_the_plans(tmp_path, monkeypatch, plans, capsys) -> None:
    from nnunet_kd.tools.cli import main

    folder = tmp_path / "Dataset042_Liver"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["batch-plans", "Dataset042_Liver", "--batch-size", "5"]) == 0
    variant = json.loads((folder / "nnUNetPlans_bs5.json").read_text())
    assert variant == with_batch_size(plans, ["3d_fullres"], 5)
    assert "3d_fullres: batch 2 -> 5" in capsys.readouterr().out
    assert main(["batch-plans", "Dataset042_Liver", "--batch-size", "5", "-p", "nnUNetPlans_other"]) == 2
    assert "nnUNetPlans_other.json not found" in capsys.readouterr().err
