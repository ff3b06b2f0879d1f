"""Barlow Twins loss, channel selection, the student's dataset.json/plans and the multi-modal generated dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_kd.core.settings import BarlowTwinsSettings, KDConfigurationError
from nnunet_kd.data.synthetic import SyntheticSpec
from nnunet_kd.data.synthetic_multimodal import CHANNEL_NAMES, write_multimodal_dataset
from nnunet_kd.losses import BarlowTwinsLoss, barlow_twins_loss
from nnunet_kd.losses.barlow_twins import cross_correlation, voxels_as_samples
from nnunet_kd.students.modalities import (
    SelectChannels,
    build_network_checking_channels,
    select_channels,
    student_dataset_json,
    student_plans,
    subset_raw_dataset,
)

BRATS = {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T1CE"}, "labels": {"background": 0, "a": 1},
         "file_ending": ".nii.gz", "numTraining": 2}


def _whitened(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """n samples of c features that are exactly standardised and mutually uncorrelated."""
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    return q * n ** 0.5


# ---- loss ----
def test_identical_decorrelated_features_give_zero():
    z = _whitened(500, 8)
    assert barlow_twins_loss(z, z, eps=0, relative_eps=0).item() == pytest.approx(0, abs=1e-10)
    # any per-feature affine change leaves the correlation, and so the loss, unchanged
    assert barlow_twins_loss(3 * z + 7, z, eps=0, relative_eps=0).item() == pytest.approx(0, abs=1e-10)


def test_on_diagonal_term_counts_uncorrelated_features():
    a, b = _whitened(400, 6, seed=1), _whitened(400, 6, seed=2)
    c = cross_correlation(a, b, eps=0, relative_eps=0)
    expected = ((1 - torch.diagonal(c)) ** 2).sum() / 6
    assert barlow_twins_loss(a, b, lambd=0, eps=0, relative_eps=0).item() == pytest.approx(expected.item())
    # sign flip: perfectly anti-correlated features cost (1 - (-1))² = 4 each
    z = _whitened(400, 6)
    assert barlow_twins_loss(z, -z, lambd=0, eps=0, relative_eps=0).item() == pytest.approx(4.0)


def test_redundancy_term_penalises_correlated_features():
    # every feature a copy of one: the diagonal is perfect, all C(C-1) off-diagonal entries are 1
    x = _whitened(300, 1).repeat(1, 5)
    for lambd in (0.0, 0.005, 1.0):
        assert barlow_twins_loss(x, x, lambd=lambd, eps=0, relative_eps=0).item() == pytest.approx(lambd * 5 * 4 / 5)
    z = _whitened(300, 5)
    assert barlow_twins_loss(z, z, lambd=1.0, eps=0, relative_eps=0).item() == pytest.approx(0, abs=1e-10)


def test_voxels_are_samples_so_batch_one_works():
    features = torch.randn(1, 16, 3, 4, 5)
    samples = voxels_as_samples(features)
    assert samples.shape == (60, 16)
    assert torch.equal(samples[7], features[0, :, 0, 1, 2])
    loss = BarlowTwinsLoss(16)(features, features)
    assert torch.isfinite(loss) and loss >= 0
    assert BarlowTwinsLoss(16)(features.expand(2, -1, -1, -1, -1), features.expand(2, -1, -1, -1, -1)) == \
        pytest.approx(loss.item(), rel=1e-5)


def test_constant_feature_is_finite():
    a = torch.randn(50, 4)
    a[:, 2] = 0.0  # a dead channel
    b = torch.randn(50, 4, requires_grad=True)
    loss = barlow_twins_loss(a, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(b.grad).all()


def test_gradcheck_loss_and_projector():
    a = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: barlow_twins_loss(x, y, lambd=0.3), (a, b))
    module = BarlowTwinsLoss(4, lambd=0.1, projector_dim=3).double()
    fa = torch.randn(2, 4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    fb = torch.randn(2, 4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (fa, fb))


def test_loss_is_float32_under_autocast_and_projector_is_trainable():
    module = BarlowTwinsLoss(8, projector_dim=6)
    a, b = torch.randn(2, 8, 2, 2, 2).bfloat16(), torch.randn(2, 8, 2, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(a, b)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    assert sum(p.numel() for p in BarlowTwinsLoss(8).parameters()) == 0


def test_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match="equal shape"):
        barlow_twins_loss(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))


# ---- channel selection ----
def test_select_channels_by_name_in_the_students_order():
    selection = select_channels(BRATS, " FLAIR, T1CE ")
    assert selection.names == ("FLAIR", "T1CE") and selection.indices == (2, 3)
    assert select_channels(BRATS, "T1CE,T1").indices == (3, 0)


@pytest.mark.parametrize("spec, message", [
    ("FLAIR,T1C", r"T1C not in dataset.json channel_names \(T1, T2, FLAIR, T1CE\)"),
    ("flair,T1CE", "case-sensitive: did you mean FLAIR"),
    ("FLAIR,FLAIR", "names FLAIR more than once"),
    ("", "is empty"),
    (" , ", "is empty"),
    ("T1CE,FLAIR,T2,T1", "selects every channel"),
])
def test_select_channels_errors(spec, message):
    with pytest.raises(KDConfigurationError, match=message):
        select_channels(BRATS, spec)


def test_ambiguous_channel_names_are_refused():
    with pytest.raises(KDConfigurationError, match="repeated names"):
        select_channels({"channel_names": {"0": "MR", "1": "MR", "2": "CT"}}, "MR")


def test_settings_parse_booleans_and_validate():
    settings = BarlowTwinsSettings().with_environment({"nnUNet_KD_teacher_receives_kd": "False",
                                                       "nnUNet_KD_student_channels": "FLAIR,T1CE",
                                                       "nnUNet_KD_projector_dim": "32"})
    assert settings == BarlowTwinsSettings(student_channels="FLAIR,T1CE", projector_dim=32, teacher_receives_kd=False)
    assert BarlowTwinsSettings().barlow_lambda == 0.005 and BarlowTwinsSettings().teacher_receives_kd is True
    with pytest.raises(KDConfigurationError, match="is not true or false"):
        BarlowTwinsSettings().with_environment({"nnUNet_KD_teacher_receives_kd": "sometimes"})
    with pytest.raises(KDConfigurationError, match="barlow_lambda"):
        BarlowTwinsSettings(barlow_lambda=-1)


def test_student_dataset_json_and_plans_describe_only_its_channels():
    selection = select_channels(BRATS, "FLAIR,T1CE")
    student = student_dataset_json(BRATS, selection)
    assert student["channel_names"] == {"0": "FLAIR", "1": "T1CE"} and student["labels"] == BRATS["labels"]
    assert BRATS["channel_names"]["0"] == "T1", "the dataset's own dataset.json must stay unchanged"
    plans = {"foreground_intensity_properties_per_channel": {str(i): {"mean": float(i)} for i in range(4)},
             "configurations": {
                 "3d_fullres": {"normalization_schemes": ["Z0", "Z1", "Z2", "CT3"],
                                "use_mask_for_norm": [False, True, False, True]},
                 "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    subset = student_plans(plans, selection)
    assert subset["foreground_intensity_properties_per_channel"] == {"0": {"mean": 2.0}, "1": {"mean": 3.0}}
    assert subset["configurations"]["3d_fullres"] == {"normalization_schemes": ["Z2", "CT3"],
                                                      "use_mask_for_norm": [False, True]}
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"][0] == "Z0"
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["Z0"]
    with pytest.raises(KDConfigurationError, match="re-run nnUNetv2_plan_and_preprocess"):
        student_plans(plans, selection)


def test_student_network_names_a_wrong_channel_count_and_select_channels_feeds_it():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {"dataset_name": "x", "plans_name": "p", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [8, 8, 8], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_fullres": {
                 "data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [8, 8, 8], "median_image_size_in_voxels": [8, 8, 8], "spacing": [1, 1, 1],
                 "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False] * 2,
                 "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg":
                     "resample_data_or_seg_to_shape", "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                 "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
                 "resampling_fn_probabilities_kwargs": {},
                 "architecture": {"network_class_name":
                                  "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op":
                                                  "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 2,
                                                  "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
                                                  "n_conv_per_stage_decoder": [1], "conv_bias": True,
                                                  "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                                  "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                                                  "dropout_op": None, "dropout_op_kwargs": None,
                                                  "nonlin": "torch.nn.LeakyReLU",
                                                  "nonlin_kwargs": {"inplace": True}},
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    manager = PlansManager(plans)
    network = build_network_checking_channels(manager, manager.get_configuration("3d_fullres"), 2, 3, False)
    x = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="takes 2 input channels, got 4.*dataset.json"):
        network(x)
    wrapped = SelectChannels(network, (2, 3))
    assert wrapped.decoder is network.decoder
    with torch.no_grad():
        assert torch.equal(wrapped(x), network(x[:, [2, 3]]))


# ---- generated data and the channel-subset copy ----
def test_multimodal_dataset_and_subset_copy(tmp_path):
    spec = SyntheticSpec(shape=(20, 28, 28), num_training=2, num_test=1, seed=3)
    folder = write_multimodal_dataset(tmp_path / "raw", 912, spec=spec)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == CHANNEL_NAMES
    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "imagesTr" / f"case_000_{c:04d}.nii.gz")))
              for c in range(4)]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "case_000.nii.gz")))
    assert all(i.shape == seg.shape == (20, 28, 28) for i in images)
    lesion, organ = seg == 2, seg == 1
    # T2 shows lesions far above the organ; FLAIR only by about the noise level
    t2, flair = images[1], images[2]
    assert lesion.any() and organ.any()
    assert (t2[lesion].mean() - t2[organ].mean()) / t2[seg == 0].std() > 2
    assert (flair[lesion].mean() - flair[organ].mean()) / flair[seg == 0].std() < 2

    subset = subset_raw_dataset(folder, tmp_path / "raw" / "Dataset913_sub", "T1CE,FLAIR")
    assert json.loads((subset / "dataset.json").read_text())["channel_names"] == {"0": "T1CE", "1": "FLAIR"}
    assert sorted(p.name for p in (subset / "imagesTr").iterdir()) == \
        ["case_000_0000.nii.gz", "case_000_0001.nii.gz", "case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert (subset / "imagesTr" / "case_001_0000.nii.gz").read_bytes() == \
        (folder / "imagesTr" / "case_001_0003.nii.gz").read_bytes()
    assert (subset / "imagesTs" / "case_002_0001.nii.gz").read_bytes() == \
        (folder / "imagesTs" / "case_002_0002.nii.gz").read_bytes()
    assert np.array_equal(sorted(p.name for p in (subset / "labelsTr").iterdir()), ["case_000.nii.gz",
                                                                                    "case_001.nii.gz"])
    with pytest.raises(KDConfigurationError, match="exists"):
        subset_raw_dataset(folder, subset, "T1CE")
    with pytest.raises(KDConfigurationError, match="selects every channel"):
        subset_raw_dataset(folder, tmp_path / "raw" / "Dataset914_all", "T1,T2,FLAIR,T1CE")
    assert not (tmp_path / "raw" / "Dataset914_all").exists()


def test_a_near_constant_feature_does_not_dominate_the_gradient():
    """A dead bottleneck channel (std 1e-4) among unit-variance ones, fewer samples (128) than features (320), as with
    nnU-Net's batch of 2 and a 4³ bottleneck: its gradient stays within 1/sqrt(relative_eps) = 10x the others'
    (with eps alone it was 1/sqrt(1e-5) = 316x)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(128, 320, dtype=torch.float64, generator=generator)
    a[:, 0] = 1.0 + 1e-4 * torch.randn(128, dtype=torch.float64, generator=generator)
    b = torch.randn(128, 320, dtype=torch.float64, generator=generator)
    a.requires_grad_()
    barlow_twins_loss(a, b).backward()
    per_feature = a.grad.norm(dim=0)
    assert per_feature[0] / per_feature[1:].median() < 11
