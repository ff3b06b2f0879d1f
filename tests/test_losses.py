"""Unit tests for the output-space KD losses and their deep-supervision wrapper (CPU, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_kd.losses import (
    DeepSupervisionKD,
    LogitMatchingLoss,
    SoftTargetKDLoss,
    kd_scale_weights,
    resample_logits,
)

SHAPES = [(2, 4, 3, 5, 6), (2, 3, 7, 5)]  # B x K x D x H x W and B x K x H x W


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _softmax_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ_k p_t log(p_t / p_s) per voxel, averaged over voxels, in float64 from explicit probabilities."""
    p_s = torch.softmax(student.double() / temperature, 1)
    p_t = torch.softmax(teacher.double() / temperature, 1)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def _binary_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over channels and voxels of KL(Bernoulli(p_t) || Bernoulli(p_s)), in float64."""
    p_s = torch.sigmoid(student.double() / temperature)
    p_t = torch.sigmoid(teacher.double() / temperature)
    kl = p_t * (p_t.log() - p_s.log()) + (1 - p_t) * ((1 - p_t).log() - (1 - p_s).log())
    return kl.mean()


# ---------------------------------------------------------------- SoftTargetKDLoss

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_soft_target_is_zero_when_student_equals_teacher(shape, activation) -> None:
    logits = 3 * torch.randn(shape)
    loss = SoftTargetKDLoss(temperature=2.0, activation=activation)(logits, logits.clone())
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_soft_target_is_positive_when_student_differs(activation) -> None:
    student, teacher = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    assert SoftTargetKDLoss(2.0, activation)(student, teacher).item() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_soft_target_softmax_equals_t_squared_times_hand_computed_kl(temperature, shape) -> None:
    student, teacher = 2 * torch.randn(shape), 2 * torch.randn(shape)
    loss = SoftTargetKDLoss(temperature, "softmax")(student, teacher)
    expected = temperature ** 2 * _softmax_kl_by_hand(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_soft_target_sigmoid_equals_t_squared_times_mean_binary_kl(temperature, shape) -> None:
    student, teacher = 2 * torch.randn(shape), 2 * torch.randn(shape)
    loss = SoftTargetKDLoss(temperature, "sigmoid")(student, teacher)
    expected = temperature ** 2 * _binary_kl_by_hand(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_softmax_does_not_depend_on_number_of_classes(temperature) -> None:
    # extra classes with probability ~0 in both distributions add nothing to the per-voxel KL; a loss that averaged
    # over classes (F.kl_div(reduction='mean')) would shrink by K / (K + extra)
    student, teacher = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    padding = torch.full((2, 5, 4, 5, 6), -1e4)
    loss = SoftTargetKDLoss(temperature, "softmax")
    small = loss(student, teacher)
    large = loss(torch.cat([student, padding], 1), torch.cat([teacher, padding], 1))
    assert large.item() == pytest.approx(small.item(), rel=1e-5)
    # summed over classes, averaged over voxels (B * D * H * W of them)
    p_s, p_t = F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1)
    per_voxel = (p_t.exp() * (p_t - p_s)).sum(1)
    assert per_voxel.shape == (2, 4, 5, 6)
    assert small.item() == pytest.approx(temperature ** 2 * per_voxel.sum().item() / per_voxel.numel(), rel=1e-5)


def test_soft_target_softmax_matches_value_worked_out_by_hand() -> None:
    # teacher logits (ln 3, 0) -> p_t = (3/4, 1/4); student logits (0, 0) -> p_s = (1/2, 1/2)
    teacher = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1, 1)
    student = torch.zeros(1, 2, 1, 1, 1)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # = 0.1308...
    assert SoftTargetKDLoss(1.0)(student, teacher).item() == pytest.approx(kl, rel=1e-6)
    # at T = 2, teacher logits (2 ln 3, 0) give the same p_t, and the result is multiplied by T² = 4
    assert SoftTargetKDLoss(2.0)(student, 2 * teacher).item() == pytest.approx(4 * kl, rel=1e-6)


def test_soft_target_sigmoid_matches_value_worked_out_by_hand() -> None:
    # teacher logit 0 -> p_t = 1/2; student logit ln 3 -> p_s = 3/4
    teacher = torch.zeros(1, 1, 1, 1, 1)
    student = torch.full((1, 1, 1, 1, 1), math.log(3.0))
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = ln(4/3) / 2
    assert SoftTargetKDLoss(1.0, "sigmoid")(student, teacher).item() == pytest.approx(kl, rel=1e-6)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_soft_target_gradient_reaches_student_only(activation) -> None:
    student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    SoftTargetKDLoss(2.0, activation)(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_soft_target_computes_in_float32_for_half_inputs(dtype, activation) -> None:
    student, teacher = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    loss = SoftTargetKDLoss(2.0, activation)
    half = loss(student.to(dtype), teacher.to(dtype))
    assert half.dtype == torch.float32
    # the same as the float32 loss of the rounded inputs: no half-precision arithmetic inside
    assert half.item() == pytest.approx(loss(student.to(dtype).float(), teacher.to(dtype).float()).item(), rel=1e-6)


@pytest.mark.parametrize("loss", [SoftTargetKDLoss(), LogitMatchingLoss()])
def test_losses_reject_shape_mismatch(loss) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        loss(torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        loss(torch.randn(1, 3, 4, 4, 4), torch.randn(1, 4, 4, 4, 4))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_soft_target_rejects_non_positive_temperature(temperature) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SoftTargetKDLoss(temperature)


def test_losses_reject_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        SoftTargetKDLoss(1.0, "relu")
    with pytest.raises(ValueError, match="activation"):
        LogitMatchingLoss("softplus")


# ---------------------------------------------------------------- LogitMatchingLoss

@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_logit_matching_is_zero_when_equal(activation) -> None:
    logits = torch.randn(2, 3, 4, 4, 4)
    assert LogitMatchingLoss(activation)(logits, logits.clone()).item() == 0.0


def test_logit_matching_softmax_ignores_per_voxel_shift_of_student_logits() -> None:
    student, teacher = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    shift = 10 * torch.randn(2, 1, 4, 5, 6)  # one constant per voxel, shared by all classes
    loss = LogitMatchingLoss("softmax")
    assert loss(student + shift, teacher).item() == pytest.approx(loss(student, teacher).item(), rel=1e-5)


def test_logit_matching_sigmoid_does_not_ignore_per_voxel_shift() -> None:
    student, teacher = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    shift = 10 * torch.randn(2, 1, 4, 5, 6)
    loss = LogitMatchingLoss("sigmoid")
    assert loss(student + shift, teacher).item() > 2 * loss(student, teacher).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_matching_softmax_is_mse_of_class_centred_logits(shape) -> None:
    student, teacher = torch.randn(shape), torch.randn(shape)
    s = student.double() - student.double().mean(1, keepdim=True)
    t = teacher.double() - teacher.double().mean(1, keepdim=True)
    expected = ((s - t) ** 2).mean()
    assert LogitMatchingLoss("softmax")(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_matching_sigmoid_is_plain_mse() -> None:
    student, teacher = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    expected = ((student.double() - teacher.double()) ** 2).mean()
    assert LogitMatchingLoss("sigmoid")(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_matching_is_half_the_high_temperature_limit_of_soft_targets() -> None:
    # T²·KL(softmax(z_t/T) || softmax(z_s/T)) -> (1/2K) Σ_k (Δz_k - mean Δz)² per voxel as T grows
    student, teacher = torch.randn(2, 4, 4, 5, 6), torch.randn(2, 4, 4, 5, 6)
    soft = SoftTargetKDLoss(temperature=100.0)(student, teacher)
    matching = LogitMatchingLoss()(student, teacher)
    assert soft.item() == pytest.approx(matching.item() / 2, rel=1e-2)


def test_logit_matching_gradient_reaches_student_only_and_is_float32() -> None:
    student = torch.randn(2, 3, 4, 4, 4, dtype=torch.float16, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, 4, dtype=torch.float16, requires_grad=True)
    loss = LogitMatchingLoss()(student, teacher)
    assert loss.dtype == torch.float32
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# ---------------------------------------------------------------- scale weights, resampling, deep supervision

def test_kd_scale_weights_full_uses_full_resolution_only() -> None:
    assert kd_scale_weights(4, "full") == [1.0, 0.0, 0.0, 0.0]
    assert kd_scale_weights(1, "full") == [1.0]


def test_kd_scale_weights_all_match_nnunet_deep_supervision_weights() -> None:
    # nnUNetTrainer._build_loss: 1 / 2**i, lowest resolution set to 0, normalised to sum 1
    raw = [1.0, 0.5, 0.25, 0.125, 0.0]
    expected = [w / sum(raw) for w in raw]
    weights = kd_scale_weights(5, "all")
    assert weights == pytest.approx(expected)
    assert sum(weights) == pytest.approx(1.0)
    assert kd_scale_weights(1, "all") == [1.0]


def test_kd_scale_weights_rejects_unknown_setting() -> None:
    with pytest.raises(ValueError, match="'full' or 'all'"):
        kd_scale_weights(3, "some")


def test_resample_logits_is_identity_at_same_shape() -> None:
    logits = torch.randn(1, 3, 4, 4, 4, dtype=torch.float16)
    assert resample_logits(logits, (4, 4, 4)) is logits


def test_resample_logits_area_averages_exact_factor_two() -> None:
    logits = torch.randn(2, 3, 8, 6, 4)
    assert torch.allclose(resample_logits(logits, (4, 3, 2)), F.avg_pool3d(logits, 2), atol=1e-6)
    logits_2d = torch.randn(2, 3, 8, 6)
    assert torch.allclose(resample_logits(logits_2d, (4, 3)), F.avg_pool2d(logits_2d, 2), atol=1e-6)


def test_resample_logits_returns_float32() -> None:
    logits = torch.randn(1, 3, 8, 8, 8).to(torch.bfloat16)
    assert resample_logits(logits, (4, 4, 4)).dtype == torch.float32


def test_deep_supervision_kd_resamples_teacher_to_every_student_scale() -> None:
    teacher = torch.randn(2, 3, 8, 8, 8)
    students = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    weights = kd_scale_weights(3, "all")
    loss = SoftTargetKDLoss(2.0)
    expected = sum(w * loss(s, F.avg_pool3d(teacher, 2 ** i)) for i, (w, s) in enumerate(zip(weights, students))
                   if w > 0)
    assert DeepSupervisionKD(loss, weights)(students, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_deep_supervision_kd_skips_zero_weighted_outputs() -> None:
    # a zero-weighted output is neither resampled nor compared: a wrong shape there must not matter
    teacher, full = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    broken = torch.randn(2, 7, 3, 3)
    loss = LogitMatchingLoss()
    value = DeepSupervisionKD(loss, [1.0, 0.0])([full, broken], teacher)
    assert value.item() == pytest.approx(loss(full, teacher).item(), rel=1e-6)


def test_deep_supervision_kd_weights_each_scale() -> None:
    teacher = torch.randn(1, 3, 8, 8, 8)
    students = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]
    loss = LogitMatchingLoss()
    value = DeepSupervisionKD(loss, [0.25, 2.0])(students, teacher)
    expected = 0.25 * loss(students[0], teacher) + 2.0 * loss(students[1], F.avg_pool3d(teacher, 2))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_deep_supervision_kd_accepts_single_tensor_output() -> None:
    student, teacher = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    loss = SoftTargetKDLoss(1.0)
    value = DeepSupervisionKD(loss, kd_scale_weights(1, "full"))(student, teacher)
    assert value.item() == pytest.approx(loss(student, teacher).item(), rel=1e-6)


def test_deep_supervision_kd_resamples_teacher_for_lower_resolution_single_output() -> None:
    student, teacher = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 8, 8, 8)
    loss = LogitMatchingLoss()
    value = DeepSupervisionKD(loss, [1.0])(student, teacher)
    assert value.item() == pytest.approx(loss(student, F.avg_pool3d(teacher, 2)).item(), rel=1e-6)


def test_deep_supervision_kd_gradient_reaches_every_weighted_student_output() -> None:
    teacher = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    students = [torch.randn(1, 3, 8, 8, 8, requires_grad=True), torch.randn(1, 3, 4, 4, 4, requires_grad=True),
                torch.randn(1, 3, 2, 2, 2, requires_grad=True)]
    DeepSupervisionKD(SoftTargetKDLoss(2.0), kd_scale_weights(3, "all"))(students, teacher).backward()
    assert teacher.grad is None
    assert students[0].grad.abs().sum() > 0 and students[1].grad.abs().sum() > 0
    assert students[2].grad is None  # weight 0: never part of the graph


@pytest.mark.parametrize("weights", [[], [-1.0, 1.0], [0.0, 0.0]])
def test_deep_supervision_kd_rejects_invalid_weights(weights) -> None:
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionKD(LogitMatchingLoss(), weights)
