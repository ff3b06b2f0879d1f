"""Class-affinity distillation (after Zhao et al., IEEE TMI 2023): match how the classes co-occur, not the voxels.

At one output scale, `P = act(z / T)` is reshaped per sample to K x N (K classes, N voxels) and the class-affinity
matrix `M = P Pᵀ / N` (K x K) summarises which classes the network predicts together. Teacher and student matrices
are compared column by column with cosine similarity; the loss is `1 - cos(M_t[:, j], M_s[:, j])`, averaged over the
K columns and over every sample of the batch. Everything is computed in float32 whatever the autocast state.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

Activation = Literal["softmax", "sigmoid"]


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"Student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in "
                         f"shape; resample the teacher output to the student's resolution first.")
    _check_probabilities(student, "Logits")


def _check_probabilities(x: torch.Tensor, name: str = "Probabilities") -> None:
    if x.ndim < 3 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, K, *spatial) with at least one sample, class and voxel, got "
                         f"{tuple(x.shape)}.")


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on `device`: it would otherwise run the matrix product in float16/bfloat16."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (e.g. meta) has no autocast state to disable
        return contextlib.nullcontext()


def class_affinity(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-sample class-affinity matrices `P Pᵀ / N` (B x K x K, float32) of probabilities shaped (B, K, *spatial).

    Entry (i, j) is the mean over voxels of `p_i · p_j`. The division by the voxel count N does not change the cosine
    similarity the loss is built on; it keeps the entries in [0, 1] so that large 3D patches (N ~ 10⁶) cannot push
    the sums out of float32's accurate range, and it makes M comparable across patch sizes and resolutions.
    The matrix is symmetric and positive semi-definite by construction.
    """
    _check_probabilities(probabilities)
    b, k = probabilities.shape[:2]
    with _autocast_off(probabilities.device):
        p = probabilities.float().reshape(b, k, -1)
        # dividing by N leaves the cosine unchanged; it only keeps M in [0, 1] for float32 with large 3D patches
        return torch.bmm(p, p.transpose(1, 2)) / p.shape[2]


def _unit_columns(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns of `m` (B x K x K) scaled to unit L2 norm; an all-zero column stays zero (its cosine is then 0).

    Cosine similarity ignores each column's scale, so each column is first divided by its largest magnitude, which
    leaves every non-zero column with a norm >= 1. Without this, a class absent from the patch has affinities so small
    that the column norm falls below `eps` and is clamped, or its squares underflow float32 to a norm of 0; either way
    that column's cosine drops towards 0 and the loss towards 1 even for identical inputs. This is common, not exotic:
    softmax logits ~20 below the winner everywhere, or sigmoid logits below ~-12 on every channel, are enough.
    The scale is detached: the loss is invariant to it, so its gradient is exactly zero.
    """
    scale = m.detach().abs().amax(dim=1, keepdim=True)
    m = m / torch.where(scale > 0, scale, torch.ones_like(scale))
    return m / torch.linalg.vector_norm(m, dim=1, keepdim=True).clamp_min(eps)


class ClassAffinityKDLoss(nn.Module):
    """`1 - cos(M_t[:, j], M_s[:, j])` with `M = class_affinity(act(z / T))`, averaged over columns and samples.

    softmax: one categorical distribution per voxel (label-based nnU-Net training).
    sigmoid: one independent probability per channel and voxel (region-based training); M then relates the regions.
    Each sample is weighted equally, so the loss of a batch is the mean of the per-sample losses. Affinity entries are
    non-negative, so every cosine lies in [0, 1] and so does the loss; it is symmetric in its arguments, but only the
    student receives a gradient (the teacher is detached). `eps` bounds the column norms from below, so that an
    all-zero column gives cosine 0 instead of NaN. There is no `T²` factor: the loss is a bounded similarity, not a KL.
    """

    def __init__(self, temperature: float = 1.0, activation: Activation = "softmax", eps: float = 1e-8) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.temperature = float(temperature)
        self.activation = activation
        self.eps = float(eps)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float() / self.temperature
        return torch.softmax(z, 1) if self.activation == "softmax" else torch.sigmoid(z)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_logits(student_logits, teacher_logits)
        with _autocast_off(student_logits.device):
            m_s = class_affinity(self._probabilities(student_logits))
            m_t = class_affinity(self._probabilities(teacher_logits.detach()))
            # column j of M is M[:, :, j]: the cosine reduces over the row axis (dim 1); B x K cosines
            cosine = (_unit_columns(m_s, self.eps) * _unit_columns(m_t, self.eps)).sum(1)
            return (1 - cosine).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, activation={self.activation!r}, eps={self.eps}"
