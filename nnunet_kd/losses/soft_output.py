"""Output-space distillation losses: soft targets (Hinton et al. 2015) and logit matching (Ba & Caruana 2014).

Every loss takes student and teacher logits of shape (B, K, *spatial), computes in float32 whatever the autocast
state, and normalises per voxel, so its scale does not depend on the number of classes or on the patch size.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["softmax", "sigmoid"]


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"Student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in "
                         f"shape; resample the teacher output to the student's resolution first.")


class SoftTargetKDLoss(nn.Module):
    """`T² · KL(p_t || p_s)` with `p = act(z / T)`: summed over classes, averaged over voxels.

    softmax: one categorical distribution per voxel (label-based nnU-Net training).
    sigmoid: one Bernoulli distribution per channel and voxel (region-based training), averaged over channels, since
    regions overlap and each output channel is its own binary problem.
    The `T²` factor keeps the gradient scale comparable across temperatures (Hinton et al. 2015).
    """

    def __init__(self, temperature: float = 1.0, activation: Activation = "softmax") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.temperature = float(temperature)
        self.activation = activation

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_shapes(student_logits, teacher_logits)
        s = student_logits.float() / self.temperature
        t = teacher_logits.detach().float() / self.temperature
        if self.activation == "softmax":
            log_p_s, log_p_t = F.log_softmax(s, 1), F.log_softmax(t, 1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
        else:
            # log(1 - sigmoid(z)) = logsigmoid(-z): stable for large |z|
            p_t = torch.sigmoid(t)
            kl = (p_t * (F.logsigmoid(t) - F.logsigmoid(s))
                  + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))).mean()
        return kl * self.temperature ** 2


class LogitMatchingLoss(nn.Module):
    """Mean squared error between logits, averaged over classes and voxels.

    softmax: logits are centred over the class axis first, because softmax ignores a per-voxel shift and the student
    should not be asked to copy it. This is the high-temperature limit of soft-target KD: `T²·KL -> MSE / 2`.
    sigmoid: each channel's logit is meaningful on its own, so no centring.
    """

    def __init__(self, activation: Activation = "softmax") -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_shapes(student_logits, teacher_logits)
        s, t = student_logits.float(), teacher_logits.detach().float()
        if self.activation == "softmax":
            s = s - s.mean(1, keepdim=True)
            t = t - t.mean(1, keepdim=True)
        return F.mse_loss(s, t)
