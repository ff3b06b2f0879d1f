"""Top-k teacher targets: what encoding keeps and loses, and the KD loss it gives against dense targets."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_kd.losses import SoftTargetKDLoss
from nnunet_kd.teachers.compact_targets import (
    TAIL_FLOOR,
    decode_top_k,
    encode_top_k,
    index_dtype,
    tail_profile_sums,
    tail_weights,
)


def _confident_log_probs(num_classes: int, shape=(6, 7, 8), seed: int = 0) -> torch.Tensor:
    """A teacher's log-probabilities: one class dominant per voxel, a few neighbours likely, the rest tiny."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, *shape, generator=generator) * 2
    winner = torch.randint(num_classes, shape, generator=generator)
    logits.scatter_add_(0, winner[None], torch.full((1, *shape), 9.0))
    return torch.log_softmax(logits, 0)


def test_top_k_keeps_the_largest_probabilities_and_the_mass_outside_them():
    log_probs = _confident_log_probs(50)
    indices, values = encode_top_k(log_probs, 4)
    assert indices.dtype == torch.uint8 and values.dtype == torch.float16
    assert indices.shape == (4, 6, 7, 8) and values.shape == (5, 6, 7, 8)
    expected_values, expected_indices = log_probs.topk(4, 0)
    assert torch.equal(indices.long(), expected_indices)
    assert torch.allclose(values[:4].float(), expected_values, atol=1e-2, rtol=1e-3)
    tail_mass = 1 - expected_values.exp().sum(0)
    assert torch.allclose(values[4].float().exp(), tail_mass, rtol=1e-2, atol=1e-7)

    decoded = decode_top_k(indices[None], values[None], 50)[0]
    assert decoded.shape == log_probs.shape
    assert torch.allclose(decoded.exp().sum(0), torch.ones(6, 7, 8), atol=2e-3)
    assert torch.allclose(decoded.gather(0, expected_indices), expected_values, atol=1e-2, rtol=1e-3)
    others = torch.ones_like(log_probs, dtype=torch.bool).scatter_(0, expected_indices, False)
    spread = (tail_mass / 46).log().expand_as(log_probs)[others]
    assert torch.allclose(decoded[others], spread, rtol=1e-2, atol=1e-2)


def test_top_k_decodes_float_batch_channels_and_never_minus_infinity():
    log_probs = torch.full((3, 4, 4), -1000.0)
    log_probs[0] = 0  # all mass in one class: the tail is empty
    indices, values = encode_top_k(log_probs, 2)
    assert values[2].float().eq(TAIL_FLOOR).all()
    decoded = decode_top_k(indices[None].float(), values[None], 3)
    assert torch.isfinite(decoded).all()
    loss = SoftTargetKDLoss(2.0)(torch.zeros(1, 3, 4, 4, requires_grad=True), decoded)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("k, num_classes", [(0, 5), (5, 5), (7, 5)])
def test_top_k_refuses_k_that_saves_nothing(k, num_classes):
    with pytest.raises(ValueError, match="1 <= k <"):
        encode_top_k(torch.zeros(num_classes, 2, 2), k)


def test_class_indices_take_int16_beyond_256_classes():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    indices, _ = encode_top_k(torch.log_softmax(torch.randn(300, 2, 3), 0), 3)
    assert indices.dtype == torch.int16 and int(indices.max()) < 300


def test_soft_target_loss_from_top_k_approaches_dense_as_k_grows_and_matches_it_when_one_class_is_left():
    """Only how the tail divides among the unlikely classes is lost: nothing when one class is left out."""
    teacher = _confident_log_probs(12, shape=(16, 16))[None]
    student = (teacher + 0.7 * torch.randn_like(teacher)).requires_grad_()
    kd = SoftTargetKDLoss(2.0)
    dense_loss = kd(student, teacher)
    dense_grad, = torch.autograd.grad(dense_loss, student)
    errors = []
    for k in (2, 4, 8, 11):
        indices, values = encode_top_k(teacher[0], k)
        loss = kd(student, decode_top_k(indices[None], values[None], 12))
        grad, = torch.autograd.grad(loss, student)
        errors.append((abs(loss.item() / dense_loss.item() - 1), (grad - dense_grad).norm() / dense_grad.norm()))
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(errors, errors[1:])), errors
    assert errors[-1][0] < 2e-3 and errors[-1][1] < 1e-2, errors  # float16 rounding only
    assert math.isfinite(errors[0][0])


def _look_alike_log_probs(num_classes: int, shape=(24, 24), seed: int = 0) -> torch.Tensor:
    """A teacher whose tail is its top class's look-alikes: class c+1 and c+2 hold what the top class leaves, in the
    same proportion everywhere, as a trained teacher's confusions follow the classes, not the voxel."""
    generator = torch.Generator().manual_seed(seed)
    winner = torch.randint(num_classes, shape, generator=generator)
    logits = torch.full((num_classes, *shape), -12.0) + 0.01 * torch.randn(num_classes, *shape, generator=generator)
    confidence = 4 + 3 * torch.rand(shape, generator=generator)
    for offset, logit in ((0, confidence), (1, torch.zeros(shape)), (2, torch.full(shape, -1.0))):
        logits.scatter_(0, ((winner + offset) % num_classes)[None], logit[None])
    return torch.log_softmax(logits, 0)


def test_tail_profile_sums_what_each_top_class_leaves_outside_its_top_k():
    log_probs = _look_alike_log_probs(10)
    indices, _ = encode_top_k(log_probs, 1)
    sums = tail_profile_sums(log_probs, indices, chunk=100)  # several chunks
    probabilities, top = log_probs.exp().reshape(10, -1), indices.reshape(-1).long()
    for c in (0, 3):
        expected = probabilities[:, top == c].sum(1).double()
        expected[c] = 0  # inside the top 1
        assert torch.allclose(sums[c], expected, rtol=1e-5)
    weights = tail_weights(sums)
    assert torch.allclose(weights.sum(1), torch.ones(10)) and (weights > 0).all()
    assert torch.allclose(tail_weights(torch.zeros(3, 3)), torch.full((3, 3), 1 / 3))  # never on top: even


def test_tail_profile_recovers_look_alike_tails_that_an_even_spread_gets_wrong():
    teacher = _look_alike_log_probs(30)[None]
    student = (teacher + 0.3 * torch.randn_like(teacher)).requires_grad_()
    kd = SoftTargetKDLoss(2.0)
    dense_loss = kd(student, teacher)
    dense_grad, = torch.autograd.grad(dense_loss, student)
    indices, values = encode_top_k(teacher[0], 1)
    weights = tail_weights(tail_profile_sums(teacher[0], indices))
    errors = {}
    for name, w in (("even", None), ("profile", weights)):
        decoded = decode_top_k(indices[None], values[None], 30, weights=w)
        assert torch.allclose(decoded.exp().sum(1), torch.ones(1, 24, 24), atol=2e-3)
        loss = kd(student, decoded)
        grad, = torch.autograd.grad(loss, student)
        errors[name] = (abs(loss.item() / dense_loss.item() - 1), float((grad - dense_grad).norm() / dense_grad.norm()))
    assert errors["profile"][0] < 0.02 and errors["profile"][1] < 0.05, errors
    assert errors["even"][0] > 10 * errors["profile"][0], errors


def test_a_confident_teachers_tail_survives_encoding():
    """p(top) = 1 - 1e-8 rounds to 1 in float32: the tail must come from the other classes, not from 1 - p(top)."""
    log_probs = torch.log_softmax(torch.tensor([[20.0], [1.0], [-2.0]]), 0)  # tail class: p ~ 5e-10
    indices, values = encode_top_k(log_probs, 2)
    assert values[2].float().item() == pytest.approx(log_probs[2].item(), abs=0.02)
    decoded = decode_top_k(indices[None], values[None], 3)[0]
    assert torch.allclose(decoded, log_probs, atol=0.02)
