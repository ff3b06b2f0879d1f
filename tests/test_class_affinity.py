"""Unit tests for the class-affinity KD loss (CPU, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_kd.losses.class_affinity import ClassAffinityKDLoss, class_affinity

SHAPES = {"3d": (4, 3, 5, 6), "2d": (3, 7, 5)}  # K x D x H x W and K x H x W, batch size prepended per test
ACTIVATIONS = ["softmax", "sigmoid"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread hand-offs, which cost ~10x on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    activation: str = "softmax") -> torch.Tensor:
    """The method written out directly in float64, without normalising M by N and without any eps.

    (F.cosine_similarity would clamp each column norm at 1e-8 and so misjudge columns of tiny affinities.)
    """
    act = (lambda z: torch.softmax(z, 1)) if activation == "softmax" else torch.sigmoid
    b, k = student.shape[:2]
    p_s = act(student.double() / temperature).reshape(b, k, -1)
    p_t = act(teacher.detach().double() / temperature).reshape(b, k, -1)
    m_s, m_t = p_s @ p_s.transpose(1, 2), p_t @ p_t.transpose(1, 2)
    cosine = (m_s * m_t).sum(1) / (m_s.norm(dim=1) * m_t.norm(dim=1))
    return (1 - cosine).mean()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-6) -> None:
    """torch.testing.assert_close's float32 tolerances, without its ~1 s first-call import cost."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"max |diff| {(actual - expected).abs().max():.3g}"


def _hand_affinity(p: list[list[float]]) -> list[list[float]]:
    """M[i][j] = mean over voxels n of p[i][n] * p[j][n], for probabilities written as p[class][voxel]."""
    n = len(p[0])
    return [[sum(a * b for a, b in zip(row_i, row_j)) / n for row_j in p] for row_i in p]


def _hand_loss(p_s: list[list[float]], p_t: list[list[float]]) -> float:
    m_s, m_t = _hand_affinity(p_s), _hand_affinity(p_t)
    k = len(m_s)
    cosines = []
    for j in range(k):
        col_s, col_t = [m_s[i][j] for i in range(k)], [m_t[i][j] for i in range(k)]
        dot = sum(a * b for a, b in zip(col_s, col_t))
        cosines.append(dot / (math.sqrt(sum(a * a for a in col_s)) * math.sqrt(sum(b * b for b in col_t))))
    return sum(1 - c for c in cosines) / k


# ---------------------------------------------------------------- zero at agreement, range, symmetry

@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_is_zero_for_identical_inputs(batch, dims, activation) -> None:
    logits = 3 * torch.randn(batch, *SHAPES[dims])
    loss = ClassAffinityKDLoss(temperature=2.0, activation=activation)(logits, logits.clone())
    assert loss.shape == ()
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_is_in_unit_range_and_positive_for_different_inputs(dims, activation) -> None:
    student, teacher = 3 * torch.randn(2, *SHAPES[dims]), 3 * torch.randn(2, *SHAPES[dims])
    loss = ClassAffinityKDLoss(activation=activation)(student, teacher).item()
    # affinities are non-negative, so every cosine is in [0, 1]: tighter than the generic [0, 2]
    assert 1e-3 < loss <= 1.0


def test_loss_approaches_one_for_disjoint_class_usage() -> None:
    """Student and teacher put all mass on different classes: orthogonal affinity columns, loss 1."""
    student = torch.full((1, 2, 4, 4), -30.0)
    teacher = student.clone()
    student[:, 0] = 30.0
    teacher[:, 1] = 30.0
    assert ClassAffinityKDLoss()(student, teacher).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_is_symmetric_in_value(activation) -> None:
    a, b = torch.randn(3, 4, 5, 6, 3), torch.randn(3, 4, 5, 6, 3)
    loss = ClassAffinityKDLoss(temperature=1.5, activation=activation)
    assert loss(a, b).item() == pytest.approx(loss(b, a).item(), abs=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_reaches_the_student_only(activation) -> None:
    student = torch.randn(2, 3, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 5, requires_grad=True)
    ClassAffinityKDLoss(activation=activation)(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ---------------------------------------------------------------- the affinity matrix

@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_affinity_is_symmetric_positive_semidefinite_and_normalised(dims, activation) -> None:
    logits = 3 * torch.randn(3, *SHAPES[dims])
    p = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
    m = class_affinity(p)
    k = p.shape[1]
    assert m.shape == (3, k, k) and m.dtype == torch.float32
    _assert_close(m, m.transpose(1, 2))
    assert (torch.linalg.eigvalsh(m.double()) > -1e-6).all()
    assert (m >= 0).all() and (m <= 1).all()
    if activation == "softmax":  # Σ_j M_ij = mean_n p_i (Σ_j p_j) = mean_n p_i, and these sum to 1
        _assert_close(m.sum(2), p.flatten(2).mean(2))
        _assert_close(m.sum((1, 2)), torch.ones(3))


def test_affinity_rejects_tensors_without_spatial_axes() -> None:
    with pytest.raises(ValueError, match="B, K, \\*spatial"):
        class_affinity(torch.rand(2, 3))
    with pytest.raises(ValueError, match="B, K, \\*spatial"):
        class_affinity(torch.rand(2, 3, 0))


# ---------------------------------------------------------------- invariances

@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_permuting_voxels_identically_leaves_loss_unchanged(dims, activation) -> None:
    student, teacher = torch.randn(2, *SHAPES[dims]), torch.randn(2, *SHAPES[dims])
    order = torch.randperm(student[0, 0].numel())

    def shuffle(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)[:, :, order].reshape(x.shape)

    loss = ClassAffinityKDLoss(activation=activation)
    assert not torch.equal(shuffle(student), student)
    assert loss(shuffle(student), shuffle(teacher)).item() == pytest.approx(loss(student, teacher).item(), abs=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_permuting_classes_identically_leaves_loss_unchanged(activation) -> None:
    student, teacher = torch.randn(2, 5, 4, 3, 6), torch.randn(2, 5, 4, 3, 6)
    order = torch.tensor([3, 0, 4, 2, 1])
    loss = ClassAffinityKDLoss(activation=activation)
    permuted = loss(student[:, order], teacher[:, order]).item()
    assert permuted == pytest.approx(loss(student, teacher).item(), abs=1e-6)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nearest_upsampling_both_leaves_affinity_and_loss_unchanged(dims, activation) -> None:
    student, teacher = torch.randn(2, *SHAPES[dims]), torch.randn(2, *SHAPES[dims])
    up_s = F.interpolate(student, scale_factor=2, mode="nearest")
    up_t = F.interpolate(teacher, scale_factor=2, mode="nearest")
    assert up_s[0, 0].numel() == student[0, 0].numel() * 2 ** (student.ndim - 2)
    p, up_p = torch.softmax(student, 1), torch.softmax(up_s, 1)
    _assert_close(class_affinity(up_p), class_affinity(p))
    loss = ClassAffinityKDLoss(activation=activation)
    assert loss(up_s, up_t).item() == pytest.approx(loss(student, teacher).item(), abs=1e-6)


# ---------------------------------------------------------------- batch handling

@pytest.mark.parametrize("batch", [2, 3, 4])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_loss_is_the_mean_of_per_sample_losses(batch, activation) -> None:
    student, teacher = torch.randn(batch, 3, 4, 5, 6), torch.randn(batch, 3, 4, 5, 6)
    # make the samples clearly different from one another, so a wrong reduction would show
    student = student * torch.arange(1, batch + 1).view(-1, 1, 1, 1, 1)
    loss = ClassAffinityKDLoss(activation=activation)
    per_sample = [loss(student[i:i + 1], teacher[i:i + 1]).item() for i in range(batch)]
    assert len({round(v, 4) for v in per_sample}) > 1
    assert loss(student, teacher).item() == pytest.approx(sum(per_sample) / batch, abs=1e-6)


# ---------------------------------------------------------------- values

def test_hand_computed_softmax_example() -> None:
    p_s = [[0.7, 0.2], [0.3, 0.8]]  # p[class][voxel]; each voxel sums to 1
    p_t = [[0.9, 0.4], [0.1, 0.6]]
    # M_s = [[(.49+.04)/2, (.21+.16)/2], [., (.09+.64)/2]], M_t = [[(.81+.16)/2, (.09+.24)/2], [., (.01+.36)/2]]
    for m, literal in ((_hand_affinity(p_s), [[0.265, 0.185], [0.185, 0.365]]),
                       (_hand_affinity(p_t), [[0.485, 0.165], [0.165, 0.185]])):
        assert [v for row in m for v in row] == pytest.approx([v for row in literal for v in row])
    expected = _hand_loss(p_s, p_t)
    assert 0.01 < expected < 0.2

    probs_s = torch.tensor(p_s).view(1, 2, 1, 2)  # B x K x H x W, a 1 x 2 image
    probs_t = torch.tensor(p_t).view(1, 2, 1, 2)
    _assert_close(class_affinity(probs_s)[0], torch.tensor(_hand_affinity(p_s)))
    loss = ClassAffinityKDLoss()(probs_s.log(), probs_t.log())  # softmax(log p) = p when Σ_k p = 1
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_sigmoid_example() -> None:
    p_s = [[0.9, 0.5, 0.1], [0.2, 0.6, 0.7]]  # independent per-channel probabilities, 3 voxels
    p_t = [[0.8, 0.3, 0.2], [0.1, 0.9, 0.9]]
    probs_s = torch.tensor(p_s).view(1, 2, 3)
    probs_t = torch.tensor(p_t).view(1, 2, 3)
    loss = ClassAffinityKDLoss(activation="sigmoid")(torch.logit(probs_s), torch.logit(probs_t))
    assert loss.item() == pytest.approx(_hand_loss(p_s, p_t), abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_value_and_gradient_match_float64_reference(temperature, dims, activation) -> None:
    student = (3 * torch.randn(3, *SHAPES[dims])).requires_grad_()
    teacher = 3 * torch.randn(3, *SHAPES[dims])
    loss = ClassAffinityKDLoss(temperature, activation)(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)

    student64 = student.detach().double().requires_grad_()
    expected = _reference_loss(student64, teacher, temperature, activation)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    _assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-7)


def test_temperature_divides_the_logits() -> None:
    student, teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    hot = ClassAffinityKDLoss(temperature=4.0)(student, teacher).item()
    assert hot == pytest.approx(ClassAffinityKDLoss()(student / 4, teacher / 4).item(), abs=1e-6)
    assert hot != pytest.approx(ClassAffinityKDLoss()(student, teacher).item(), abs=1e-4)


# ---------------------------------------------------------------- numerics

def test_all_zero_columns_give_finite_loss_and_gradient() -> None:
    """Sigmoid probabilities that are exactly 0 in float32 make a whole affinity column zero: no NaN anywhere."""
    student = torch.randn(2, 3, 4, 4)
    student[:, 1] = -200.0  # sigmoid(-200) == 0 in float32
    student.requires_grad_()
    teacher = torch.randn(2, 3, 4, 4)
    loss = ClassAffinityKDLoss(activation="sigmoid")(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    zero_both = torch.full((1, 2, 3, 3), -200.0)
    assert torch.isfinite(ClassAffinityKDLoss(activation="sigmoid")(zero_both, zero_both.clone()))


@pytest.mark.parametrize(("activation", "offset"), [("softmax", 20.0), ("softmax", 40.0), ("softmax", 104.0),
                                                    ("softmax", 200.0), ("sigmoid", -12.0), ("sigmoid", -30.0),
                                                    ("sigmoid", -40.0), ("sigmoid", -110.0)])
def test_absent_classes_with_tiny_affinities_still_compare_exactly(activation, offset) -> None:
    """Classes absent from the patch: their affinity column norms fall below eps, or their squares underflow float32.

    softmax: the last class sits `offset` logits below the others everywhere; sigmoid: every channel is near `offset`.
    A plain `F.cosine_similarity` on M gives a loss near 1 for identical inputs here; from ~104 logits below, the
    probabilities are exactly 0 in float32, so M's column is all zeros.
    """
    def make() -> torch.Tensor:
        z = torch.randn(2, 3, 4, 4, 4)
        if activation == "softmax":
            z[:, -1] -= offset
        else:
            z += offset
        return z

    logits, other = make(), make()
    p = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
    assert torch.linalg.vector_norm(class_affinity(p)[:, :, -1], dim=1).max() < 1e-8
    loss = ClassAffinityKDLoss(activation=activation)
    assert abs(loss(logits, logits.clone()).item()) < 1e-6
    expected = _reference_loss(logits, other, 1.0, activation).item()
    assert loss(logits, other).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32_output(dtype) -> None:
    student, teacher = torch.randn(2, 3, 4, 5, 6).to(dtype), torch.randn(2, 3, 4, 5, 6).to(dtype)
    loss = ClassAffinityKDLoss()(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ClassAffinityKDLoss()(student.float(), teacher.float()).item(), abs=1e-6)
    assert class_affinity(torch.softmax(student, 1)).dtype == torch.float32


def test_autocast_does_not_lower_the_precision() -> None:
    student, teacher = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 8, 8, 8)
    expected = ClassAffinityKDLoss()(student, teacher)
    p = torch.softmax(student, 1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert torch.bmm(p.flatten(2), p.flatten(2).transpose(1, 2)).dtype == torch.bfloat16  # autocast is active
        m = class_affinity(p)
        loss = ClassAffinityKDLoss()(student, teacher)
    assert m.dtype == torch.float32 and loss.dtype == torch.float32
    _assert_close(m, class_affinity(p))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


# ---------------------------------------------------------------- argument checks

def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ClassAffinityKDLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="differ in shape"):
        ClassAffinityKDLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="B, K, \\*spatial"):
        ClassAffinityKDLoss()(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")},
                                    {"activation": "relu"}, {"activation": "Softmax"}])
def test_invalid_arguments_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        ClassAffinityKDLoss(**kwargs)
