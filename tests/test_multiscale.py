"""Multi-scale KD pieces: teacher deep-supervision outputs, scale matching, settings, LCOV-Net student plans."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_kd.core.settings import KDConfigurationError, MultiScaleSettings
from nnunet_kd.losses import DeepSupervisionKD, SoftTargetKDLoss, parse_scale_weights
from nnunet_kd.students.plans import count_parameters, make_student_plans
from nnunet_kd.teachers.frozen import FrozenTeacher


def _unet(stages: int = 3, deep_supervision: bool = False) -> PlainConvUNet:
    torch.manual_seed(0)
    return PlainConvUNet(1, stages, [4 * 2 ** i for i in range(stages)], nn.Conv3d, 3, [1] + [2] * (stages - 1), 1, 3,
                         1, True, nn.InstanceNorm3d, {"affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=deep_supervision)


class _Recorder(nn.Module):
    """A KD loss that remembers which teacher tensors it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, student, teacher):
        self.seen.append(teacher)
        return (student - teacher).abs().mean()


def test_teacher_outputs_of_matching_shape_are_used_as_they_are():
    students = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    teachers = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    recorder = _Recorder()
    DeepSupervisionKD(recorder, [0.4, 0.2, 0.2])(students, teachers)
    assert all(seen is teacher for seen, teacher in zip(recorder.seen, teachers))


def test_scales_the_teacher_lacks_are_resampled_from_its_full_resolution():
    students = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    teachers = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]  # a shallower teacher
    recorder = _Recorder()
    DeepSupervisionKD(recorder, [0.4, 0.2, 0.2])(students, teachers)
    assert torch.allclose(recorder.seen[2], F.avg_pool3d(teachers[0], 4), atol=1e-6)


def test_no_weighted_output_is_an_error_not_a_silent_none():
    with pytest.raises(ValueError, match="no student output"):
        DeepSupervisionKD(SoftTargetKDLoss(), [0.0, 1.0])(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))


@pytest.mark.parametrize("text, n, expected", [("0.4,0.2,0.2,0.2", 3, [0.4, 0.2, 0.2]),
                                                ("0.4,0.2,0.2,0.2", 5, [0.4, 0.2, 0.2, 0.2, 0.0]),
                                                ("1", 2, [1.0, 0.0])])
def test_parse_scale_weights(text, n, expected):
    assert parse_scale_weights(text, n) == expected


@pytest.mark.parametrize("change", [{"seg_weight": -1.0}, {"soft_weight": float("nan")}, {"temperature": 0.0},
                                    {"scale_weights": "a,b"}, {"scale_weights": "0,0"}, {"scale_weights": ""}])
def test_multiscale_settings_reject_bad_values(change):
    with pytest.raises(KDConfigurationError):
        MultiScaleSettings(**change)


def test_multiscale_settings_from_environment():
    environ = {"nnUNet_KD_scale_weights": "0.5,0.5", "nnUNet_KD_seg_weight": "1"}
    settings = MultiScaleSettings().with_environment(environ)
    assert settings.scale_weights == "0.5,0.5" and settings.seg_weight == 1.0 and settings.affinity_weight == 0.1


def test_frozen_teacher_returns_its_deep_supervision_outputs_cropped_after_padding():
    network = _unet(3)
    teacher = FrozenTeacher([copy.deepcopy(network)], divisor=(4, 4, 4), deep_supervision=True)
    x = torch.randn(1, 1, 10, 12, 7)  # padded to 12 x 12 x 8
    outputs = teacher(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(10, 12, 7), (5, 6, 4)]
    network.decoder.deep_supervision = True
    reference = network.eval()(F.pad(x, (0, 1, 0, 0, 0, 2)))
    assert torch.allclose(outputs[1], reference[1][:, :, :5, :6, :4], atol=1e-5)
    assert not FrozenTeacher([_unet(3)], (4, 4, 4)).networks[0].decoder.deep_supervision


def test_multiscale_needs_a_teacher_with_a_deep_supervision_switch():
    class NoSwitch(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(KDConfigurationError, match="deep-supervision switch"):
        FrozenTeacher([NoSwitch()], (1, 1, 1), deep_supervision=True)


@pytest.fixture
def plans() -> dict:
    arch = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 5, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "n_conv_per_stage": [2] * 5,
            "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    return {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "label_manager": "LabelManager", "image_reader_writer": "SimpleITKIO",
            "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": [64, 64, 64], "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                              "nonlin"]}}}}


def test_lcovnet_student_plans_are_built_by_nnunet_from_the_plans_alone(plans):
    student = make_student_plans(plans, ["3d_fullres"], 1.0, arch="lcovnet")
    assert student["plans_name"] == "nnUNetPlans_KDStudent_lcovnet_w1"
    config = student["configurations"]["3d_fullres"]
    assert config["architecture"]["network_class_name"] == "nnunet_kd.architectures.lcovnet.LCOVNet"
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, 17)}}}
    teacher_parameters = count_parameters(plans, "3d_fullres", dataset_json)
    student_parameters = count_parameters(student, "3d_fullres", dataset_json)
    assert student_parameters < teacher_parameters / 5


def test_lcovnet_needs_plain_unet_plans(plans):
    resenc = copy.deepcopy(plans)
    kwargs = resenc["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    with pytest.raises(KDConfigurationError, match="PlainConvUNet"):
        make_student_plans(resenc, ["3d_fullres"], 1.0, arch="lcovnet")
    with pytest.raises(KDConfigurationError, match="Unknown --arch"):
        make_student_plans(plans, ["3d_fullres"], 1.0, arch="vit")
