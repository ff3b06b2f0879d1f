"""Applying an output-space KD loss to some or all of nnU-Net's deep-supervision outputs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resample_logits(logits: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Area-average logits to `spatial_shape`; the identity when the shape already matches.

    Averaging (rather than picking voxels) keeps every teacher voxel's information, which matters most at the coarse
    deep-supervision scales where one student voxel covers many teacher voxels.
    """
    if tuple(logits.shape[2:]) == tuple(spatial_shape):
        return logits
    return F.interpolate(logits.float(), size=tuple(spatial_shape), mode="area")


class DeepSupervisionKD(nn.Module):
    """`Σ_i w_i · loss(student_i, teacher at the resolution of student_i)` over the student's deep-supervision outputs.

    The teacher gives either its full-resolution logits or its own deep-supervision outputs. For each student output
    the teacher output of the same shape is used when there is one; otherwise the full-resolution teacher logits are
    area-resampled, so teacher and student may have different numbers of stages. Student outputs beyond the weights,
    and those with weight 0, are skipped entirely.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, student_outputs: torch.Tensor | Sequence[torch.Tensor],
                teacher_outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(student_outputs, torch.Tensor):
            student_outputs = [student_outputs]
        if isinstance(teacher_outputs, torch.Tensor):
            teacher_outputs = [teacher_outputs]
        by_shape = {tuple(t.shape[2:]): t for t in reversed(teacher_outputs)}
        total = None
        for weight, student in zip(self.weights, student_outputs):
            if weight == 0:
                continue
            shape = tuple(student.shape[2:])
            teacher = by_shape[shape] if shape in by_shape else resample_logits(teacher_outputs[0], shape)
            term = weight * self.loss(student, teacher)
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"no student output has a positive KD weight (weights {self.weights}, "
                             f"{len(student_outputs)} outputs)")
        return total


def parse_scale_weights(text: str, num_outputs: int) -> list[float]:
    """'0.4,0.2,0.2,0.2' -> one weight per deep-supervision output, full resolution first; missing ones are 0."""
    try:
        weights = [float(w) for w in text.replace(" ", ",").split(",") if w]
    except ValueError as e:
        raise ValueError(f"scale weights must be comma-separated numbers, got {text!r}") from e
    return (weights + [0.0] * num_outputs)[:num_outputs]


def kd_scale_weights(num_outputs: int, scales: str) -> list[float]:
    """Weights per deep-supervision output for the `scales` setting.

    'full': the full-resolution output only. 'all': nnU-Net's own deep-supervision weights (halving per scale, the
    lowest scale dropped, normalised to sum 1), so KD is spread over scales exactly like the segmentation loss.
    """
    if scales not in ("full", "all"):
        raise ValueError(f"KD scales must be 'full' or 'all', got {scales!r}")
    if scales == "full" or num_outputs == 1:
        return [1.0] + [0.0] * (num_outputs - 1)
    weights = [1 / 2 ** i for i in range(num_outputs)]
    weights[-1] = 0.0
    return [w / sum(weights) for w in weights]
