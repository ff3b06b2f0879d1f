"""Barlow Twins between two networks' feature maps (Zbontar et al. 2021), as used by Choi et al. (2023) for KD.

`L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²`, where `C = ẑ_aᵀ ẑ_b / N` is the cross-correlation of the two feature sets,
each feature standardised over the N samples. nnU-Net trains with batches of 2 or fewer, so a batch is too small a
sample: here every voxel of the (B, C, *spatial) feature maps is a sample (N = B · D · H · W), and the loss is divided
by C so that its scale does not grow with the bottleneck width (ours; the paper's sum is C times this).
"""
from __future__ import annotations

import torch
from torch import nn


def voxels_as_samples(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B · prod(spatial), C)."""
    if features.ndim < 3:
        raise ValueError(f"Expected feature maps of shape (B, C, *spatial), got {tuple(features.shape)}")
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def standardise(samples: torch.Tensor, eps: float = 1e-5, relative_eps: float = 1e-2) -> torch.Tensor:
    """Each feature (column) minus its mean, divided by `sqrt(var + relative_eps · mean_var + eps)`.

    Standardising divides a feature's gradient by its standard deviation, so a near-constant feature (a dead ReLU
    channel, common in a bottleneck) would get its gradient scaled by up to `1/sqrt(eps)` (~316x for unit-variance
    features) and dominate nnU-Net's clipped step. The floor, `relative_eps` times the features' mean variance,
    bounds that to `1/sqrt(relative_eps)` (10x) the gradient of a typical feature, whatever the features' scale; a
    typical feature's correlation shrinks by only `1/(1 + relative_eps)`. `eps` keeps all-constant features finite
    (zeros instead of NaN), like the reference code's BatchNorm1d(affine=False).
    """
    return _standardise(samples, samples.shape[0], eps, relative_eps, ddp=False)


def _summed_over_ranks(tensor: torch.Tensor, ddp: bool) -> torch.Tensor:
    """The sum over every DDP rank, differentiable: each rank's loss is then the global batch's, and the all-reduce of
    the gradients in backward gives each rank's samples the gradient of every rank's loss (nnU-Net's batch Dice does
    the same with AllGatherGrad; DDP's averaging then leaves the global batch's gradient)."""
    if not ddp:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def _num_samples(samples: torch.Tensor, ddp: bool) -> int:
    if not ddp:
        return samples.shape[0]
    count = torch.tensor([samples.shape[0]], dtype=torch.int64, device=samples.device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _standardise(samples: torch.Tensor, num_samples: int, eps: float, relative_eps: float, ddp: bool) -> torch.Tensor:
    # from sums over the samples, so that under DDP the statistics are those of every rank's samples together
    mean = _summed_over_ranks(samples.sum(0), ddp) / num_samples
    centred = samples - mean
    variance = _summed_over_ranks(centred.pow(2).sum(0), ddp) / num_samples
    floor = relative_eps * variance.mean() + eps
    return centred / torch.sqrt(variance + floor)


def cross_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5, relative_eps: float = 1e-2,
                      ddp: bool = False) -> torch.Tensor:
    """C x C cross-correlation of two (N, C) sample sets, each feature standardised over the N samples; with `ddp`,
    over the samples of every rank (each rank passes its own and gets the same matrix)."""
    if a.shape != b.shape:
        raise ValueError(f"Barlow Twins needs features of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    num_samples = _num_samples(a, ddp)
    if num_samples < 2:
        raise ValueError("Barlow Twins needs at least 2 samples (voxels) to standardise features")
    products = _standardise(a, num_samples, eps, relative_eps, ddp).T @ _standardise(b, num_samples, eps,
                                                                                     relative_eps, ddp)
    return _summed_over_ranks(products, ddp) / num_samples


def barlow_twins_loss(a: torch.Tensor, b: torch.Tensor, lambd: float = 0.005, eps: float = 1e-5,
                      relative_eps: float = 1e-2, ddp: bool = False) -> torch.Tensor:
    """`(Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²) / C` for (N, C) samples a and b, in their own dtype; with `ddp`, of the
    samples of every rank together."""
    c = cross_correlation(a, b, eps, relative_eps, ddp)
    diagonal = torch.diagonal(c)
    on_diagonal = (1 - diagonal).pow(2).sum()
    off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()
    return (on_diagonal + lambd * off_diagonal) / c.shape[0]


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins between two (B, C, *spatial) feature maps, computed in float32 (at least) under autocast.

    projector_dim > 0 adds a 1x1(x1) convolutional projector, shared by both inputs (as in the siamese original):
    conv(C -> P), LeakyReLU, conv(P -> P). It is trainable, so it belongs to the optimiser and the checkpoint.
    `ddp`: the loss of every DDP rank's voxels together (as nnU-Net's Dice takes `ddp` for its batch Dice), so that
    two GPUs with one case each compute what one GPU with both would.
    """

    def __init__(self, num_features: int, lambd: float = 0.005, projector_dim: int = 0, spatial_dims: int = 3,
                 eps: float = 1e-5, ddp: bool = False) -> None:
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambda must be >= 0, got {lambd}")
        if projector_dim < 0:
            raise ValueError(f"projector_dim must be >= 0 (0: no projector), got {projector_dim}")
        self.lambd, self.eps, self.ddp = float(lambd), float(eps), ddp
        self.projector: nn.Module | None = None
        if projector_dim > 0:
            conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
            self.projector = nn.Sequential(conv(num_features, projector_dim, 1), nn.LeakyReLU(inplace=True),
                                           conv(projector_dim, projector_dim, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):
            dtype = torch.promote_types(a.dtype, torch.float32)
            a, b = a.to(dtype), b.to(dtype)
            if self.projector is not None:
                a, b = self.projector(a), self.projector(b)
            return barlow_twins_loss(voxels_as_samples(a), voxels_as_samples(b), self.lambd, self.eps, ddp=self.ddp)
