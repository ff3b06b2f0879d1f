"""Top-k teacher targets: stored teacher outputs whose size does not grow with the number of classes.

Dense targets keep every class's log-probability per voxel, so a 117-class CT costs 117 float16 values per voxel on
disk and 117 channels through the data loader's augmentation. A trained teacher puts almost all of a voxel's mass on
a few classes, so per voxel this keeps:
- the indices of the `k` most probable classes (uint8 up to 256 classes, else int16),
- their log-probabilities and, as one more value, the log of the mass outside them (the "tail"), in float16.

Every probability in the top k, and the total mass outside it, is what the teacher said; how the tail divides among
the unlikely classes is not stored per voxel. Spread evenly over the other `K - k` classes it misleads a softened
loss where the tail is the top class's look-alikes (Hinton et al.'s "dark knowledge"): at T = 2 a tail class weighs
`sqrt(p)`, so 46 classes sharing a tail evenly weigh several times what one look-alike holding it does. So a tail
profile goes with the targets: per class c, the teacher's mean probability of every other class over the
voxels whose most probable class is c and where that class is outside the top k (`tail_profile_sums`, summed over
cases), and decoding divides each voxel's tail in proportion to its top class's row (`tail_weights`). Logit matching
reads every class's logit equally, tail included, and needs dense targets (the trainers say so).
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


def encode_top_k(log_probs: torch.Tensor, k: int, class_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probabilities (K along `class_axis`) -> (indices of the k largest, their log-probabilities + the tail's
    log-mass as k + 1 float16 values along that axis)."""
    num_classes = log_probs.shape[class_axis]
    check_top_k(k, num_classes)
    log_probs = log_probs.float()
    values, indices = log_probs.topk(k, dim=class_axis)
    # the tail's log-mass from the classes outside the top k, not as log(1 - top mass): a confident teacher's top
    # class has p = 1 - 1e-8, which float32 rounds to 1, and the tail it leaves would vanish
    tail = torch.logsumexp(log_probs.scatter(class_axis, indices, -math.inf), class_axis, keepdim=True)
    tail = tail.nan_to_num(nan=TAIL_FLOOR, neginf=TAIL_FLOOR).clamp_min(TAIL_FLOOR)
    return indices.to(index_dtype(num_classes)), torch.cat([values, tail], class_axis).half()


def tail_profile_sums(log_probs: torch.Tensor, indices: torch.Tensor, chunk: int = 2 ** 20) -> torch.Tensor:
    """(K, K) float64 on `log_probs`' device: row c sums, over the voxels whose most probable class is c, each class's
    probability where it is outside the voxel's top k. `log_probs` (K, ...) and `indices` (k, ...) as `encode_top_k`
    takes and gives them; in chunks of voxels, so that it needs little memory beside the case's own."""
    num_classes = log_probs.shape[0]
    flat_log_probs, flat_indices = log_probs.reshape(num_classes, -1), indices.reshape(indices.shape[0], -1).long()
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=log_probs.device)
    for start in range(0, flat_log_probs.shape[1], chunk):
        top = flat_indices[:, start:start + chunk]
        tail = flat_log_probs[:, start:start + chunk].float().exp().scatter_(0, top, 0)
        # into column c (top class) of a (class, top class) matrix: index_add along the voxels as they lie in
        # memory, 5x faster on a CPU than into rows of the transposed copy
        by_top_class = torch.zeros_like(sums, dtype=torch.float32).index_add_(1, top[0], tail)
        sums += by_top_class.T.double()
    return sums


def tail_weights(sums: torch.Tensor, floor: float = 1e-9) -> torch.Tensor:
    """(K, K) float32 rows summing to 1 from `tail_profile_sums` (added over cases): how a voxel whose top class is c
    divides its tail. A share of `floor` is spread evenly so that no class gets log-probability -inf (0 · log 0 is NaN
    in a KL); it is small because at T = 2 an unlikely class weighs sqrt(p): a larger floor would lift every class the
    teacher rules out. A class that was never on top divides its tail evenly."""
    sums = sums.double()
    totals = sums.sum(1, keepdim=True)
    shares = torch.where(totals > 0, sums / totals.clamp_min(1e-300), 1.0 / sums.shape[1])
    return ((1 - floor) * shares + floor / sums.shape[1]).float()


def decode_top_k(indices: torch.Tensor, values: torch.Tensor, num_classes: int, class_axis: int = 1,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """The dense log-probabilities (float32, `num_classes` along `class_axis`) of `encode_top_k`'s output; `indices`
    may be any dtype holding whole numbers (e.g. float channels of a training batch). The tail is divided by
    `weights` (`tail_weights`: a row per top class), or evenly without them."""
    k = indices.shape[class_axis]
    check_top_k(k, num_classes)
    values, indices = values.float(), indices.round().long()
    top, tail = values.narrow(class_axis, 0, k), values.narrow(class_axis, k, 1)
    if weights is None:
        shape = list(values.shape)
        shape[class_axis] = num_classes
        dense = (tail - math.log(num_classes - k)).expand(shape).clone()
    else:
        rows = weights.to(values.device)[indices.select(class_axis, 0)].movedim(-1, class_axis)
        rows = rows.scatter(class_axis, indices, 0)
        dense = tail + rows.log() - rows.sum(class_axis, keepdim=True).log()
    return dense.scatter_(class_axis, indices, top)
