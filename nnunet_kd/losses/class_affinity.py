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
import torch.nn.functional as F
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


def affinity_unit_columns(log_probabilities: torch.Tensor) -> torch.Tensor:
    """The columns of `M = P Pᵀ / N` scaled to unit L2 norm (B x K x K, float32), from log-probabilities (B, K, N).

    Cosine similarity ignores each column's scale, and the columns of a class absent from the patch are tiny: their
    norms fall below any eps, their squares underflow float32, and a class ~104 logits below the others has a softmax
    probability of exactly 0, so its column is all zeros and its cosine 0 even for identical inputs. So the columns
    are built in log space: with `s_i = max_v log p_i` and `q_i = exp(log p_i - s_i)` (each class's largest value is
    1), `M_ij = exp(s_i + s_j) Q_ij` where `Q = q qᵀ / N`. Column j, divided by `exp(s_j)` and by its largest entry,
    is `exp(s_i + log Q_ij - max_i(...))`: its largest entry is 1 (`Q_jj >= 1/N`), so no column vanishes, and the
    result is the unit column of M, exactly.
    """
    s = log_probabilities.amax(dim=2, keepdim=True)  # B x K x 1
    q = torch.exp(log_probabilities - s)
    q_affinity = torch.bmm(q, q.transpose(1, 2)) / q.shape[2]
    log_columns = s + torch.log(q_affinity)  # row i gets s_i
    columns = torch.exp(log_columns - log_columns.amax(dim=1, keepdim=True))
    return columns / torch.linalg.vector_norm(columns, dim=1, keepdim=True)


class ClassAffinityKDLoss(nn.Module):
    """`1 - cos(M_t[:, j], M_s[:, j])` with `M = class_affinity(act(z / T))`, averaged over columns and samples.

    softmax: one categorical distribution per voxel (label-based nnU-Net training).
    sigmoid: one independent probability per channel and voxel (region-based training); M then relates the regions.
    Each sample is weighted equally, so the loss of a batch is the mean of the per-sample losses. Affinity entries are
    non-negative, so every cosine lies in [0, 1] and so does the loss; it is symmetric in its arguments, but only the
    student receives a gradient (the teacher is detached). The columns are built in log space
    (`affinity_unit_columns`), so a class whose probability underflows to 0 still compares exactly. There is no `T²`
    factor: the loss is a bounded similarity, not a KL.
    """

    def __init__(self, temperature: float = 1.0, activation: Activation = "softmax") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.temperature = float(temperature)
        self.activation = activation

    def _log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float() / self.temperature
        log_p = torch.log_softmax(z, 1) if self.activation == "softmax" else F.logsigmoid(z)
        return log_p.reshape(*log_p.shape[:2], -1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        _check_logits(student_logits, teacher_logits)
        with _autocast_off(student_logits.device):
            columns_s = affinity_unit_columns(self._log_probabilities(student_logits))
            columns_t = affinity_unit_columns(self._log_probabilities(teacher_logits.detach()))
            # column j of M is M[:, :, j]: the cosine reduces over the row axis (dim 1); B x K cosines
            cosine = (columns_s * columns_t).sum(1)
            return (1 - cosine).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, activation={self.activation!r}"
