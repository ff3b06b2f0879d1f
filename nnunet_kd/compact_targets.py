"""Top-k teacher targets: stored teacher outputs whose size does not grow with the number of classes.

Dense targets keep every class's log-probability per voxel, so a 117-class CT costs 117 float16 values per voxel on
disk and 117 channels through the data loader's augmentation. A trained teacher puts almost all of a voxel's mass on
a few classes, so per voxel this keeps:
- the indices of the `k` most probable classes (uint8 up to 256 classes, else int16),
- their log-probabilities and, as one more value, the log of the mass outside them (the "tail"), in float16.

Decoding spreads the tail evenly over the other `K - k` classes. Every probability in the top k, and the total mass
outside it, is what the teacher said; only how the tail divides among the unlikely classes is lost. That is what a
softened soft-target loss reads least, but logit matching reads every class's logit equally, tail included: it
needs dense targets (the trainers say so).
"""
from __future__ import annotations

import math

import torch

# log(mass outside the top k) where the top k hold it all: e^-80 is still a float32 normal number, so decoding never
# produces -inf (a zero teacher probability times the student's -inf log-probability would be NaN)
TAIL_FLOOR = -80.0


def index_dtype(num_classes: int) -> torch.dtype:
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 2 ** 15:
        return torch.int16
    raise ValueError(f"{num_classes} classes: top-k targets store class indices as int16 (at most 32768 classes)")


def check_top_k(k: int, num_classes: int) -> None:
    if not 1 <= k < num_classes:
        raise ValueError(f"top-k targets need 1 <= k < the number of classes ({num_classes}), got k={k}: with k >= "
                         f"{num_classes} they would store more than the dense format (use --format dense)")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def encode_top_k(log_probs: torch.Tensor, k: int, class_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probabilities (K along `class_axis`) -> (indices of the k largest, their log-probabilities + the tail's
    log-mass as k + 1 float16 values along that axis)."""
    num_classes = log_probs.shape[class_axis]
    check_top_k(k, num_classes)
    log_probs = log_probs.float()
    values, indices = log_probs.topk(k, dim=class_axis)
    tail = _log1mexp(torch.logsumexp(values, class_axis, keepdim=True).clamp_max(0))
    tail = tail.nan_to_num(nan=TAIL_FLOOR, neginf=TAIL_FLOOR).clamp_min(TAIL_FLOOR)
    return indices.to(index_dtype(num_classes)), torch.cat([values, tail], class_axis).half()


def decode_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int, class_axis: int = 1) -> torch.Tensor:
    """The dense log-probabilities (float32, `num_classes` along `class_axis`) of `encode_top_k`'s output; `indices`
    may be any dtype holding whole numbers (e.g. float channels of a training batch)."""
    k = indices.shape[class_axis]
    check_top_k(k, num_classes)
    values = values.float()
    top, tail = values.narrow(class_axis, 0, k), values.narrow(class_axis, k, 1)
    shape = list(values.shape)
    shape[class_axis] = num_classes
    dense = (tail - math.log(num_classes - k)).expand(shape).clone()
    return dense.scatter_(class_axis, indices.round().long(), top)
