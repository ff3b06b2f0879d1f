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
    """`Σ_i w_i · loss(student_i, resample(teacher, student_i))` over the student's deep-supervision outputs.

    The teacher contributes only its full-resolution logits, so teacher and student may have different numbers of
    stages. Scales with weight 0 are skipped entirely (no resampling, no loss).
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, student_outputs: torch.Tensor | Sequence[torch.Tensor],
                teacher_logits: torch.Tensor) -> torch.Tensor:
        if isinstance(student_outputs, torch.Tensor):
            student_outputs = [student_outputs]
        total = None
        for weight, student in zip(self.weights, student_outputs):
            if weight == 0:
                continue
            term = weight * self.loss(student, resample_logits(teacher_logits, student.shape[2:]))
            total = term if total is None else total + term
        return total


def kd_scale_weights(num_outputs: int, scales: str) -> list[float]:
    """Weights per deep-supervision output for the `scales` setting.

    'full': the full-resolution output only. 'all': nnU-Net's own deep-supervision weights (halving per scale, the
    lowest scale dropped, normalised to sum 1), so KD is spread over scales exactly like the segmentation loss.
    """
    if scales == "full" or num_outputs == 1:
        return [1.0] + [0.0] * (num_outputs - 1)
    if scales == "all":
        weights = [1 / 2 ** i for i in range(num_outputs)]
        weights[-1] = 0.0
        return [w / sum(weights) for w in weights]
    raise ValueError(f"KD scales must be 'full' or 'all', got {scales!r}")
