"""LCOV-Net (Zhao et al., IEEE TMI 2023) as an nnU-Net v2 plans-compatible network.

Independent reimplementation from the paper's description. The network is a 5-level U-Net whose blocks are
lightweight attention-based convolutional blocks (LACB):

* LACB-H (every level except the bottleneck)::

      F'  = act(norm(conv_a(F)))                    # conv_a: "1x1x3", kernel only along the last axis
      F'' = dropout(act(norm(conv_b(F'))))          # conv_b: "3x3x1", kernel along all other axes
      a   = sigmoid(resize(norm(conv1x1(avgpool_k4s2p1(F')))))
      out = F'' + a * F'

* LACB-L (bottleneck): as LACB-H, but conv_b is depthwise and ``a = sigmoid(dropout(act(norm(conv1x1(F')))))``.

* Up path per decoder level: conv1x1 (to the skip's width), norm, act, dropout, linear upsampling to the skip's
  size, concatenation ``[skip, up]``, LACB-H, and a 1x1 segmentation head (one head per decoder level).

Paper setting (3D, 1 input channel, 17 classes, widths 32-64-128-256-256, isotropic strides 2, kernels 3) has
2,785,764 parameters with the choices below (paper: ~2.79 M):

* every conv carries a bias (``conv_bias=True``, the default here), norms are affine,
* the up-path 1x1 conv reduces the channels to the skip's width, so the decoder LACB-H sees ``2 * width`` inputs,
* the attention 1x1 conv keeps the width, the heads are biased 1x1 convs on each decoder LACB-H output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class _PaperDefault:
    """Sentinel: 'argument not given', as opposed to an explicit ``None`` (= no such layer) from the plans."""

    def __repr__(self) -> str:
        return "PAPER_DEFAULT"


PAPER_DEFAULT: Any = _PaperDefault()

_CONV_DIMS = {nn.Conv2d: 2, nn.Conv3d: 3}


@dataclass(frozen=True)
class LayerOps:
    """Layer factories shared by all blocks. ``None`` for norm/dropout/nonlin means identity (no such layer).

    Defaults are the paper's: BatchNorm, ReLU6, Dropout(p=0.2), biased convs, 3D.
    """

    conv_op: type[nn.Module] = nn.Conv3d
    norm_op: type[nn.Module] | None = nn.BatchNorm3d
    norm_op_kwargs: dict = field(default_factory=dict)
    dropout_op: type[nn.Module] | None = nn.Dropout
    dropout_op_kwargs: dict = field(default_factory=lambda: {"p": 0.2})
    nonlin: type[nn.Module] | None = nn.ReLU6
    nonlin_kwargs: dict = field(default_factory=lambda: {"inplace": True})
    conv_bias: bool = True

    @property
    def dim(self) -> int:
        if self.conv_op not in _CONV_DIMS:
            raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {self.conv_op}")
        return _CONV_DIMS[self.conv_op]

    def conv(self, cin: int, cout: int, kernel: Sequence[int], groups: int = 1) -> nn.Module:
        return self.conv_op(cin, cout, tuple(kernel), padding=tuple(k // 2 for k in kernel), groups=groups,
                            bias=self.conv_bias)

    def norm(self, c: int) -> nn.Module:
        return nn.Identity() if self.norm_op is None else self.norm_op(c, **self.norm_op_kwargs)

    def act(self) -> nn.Module:
        return nn.Identity() if self.nonlin is None else self.nonlin(**self.nonlin_kwargs)

    def dropout(self) -> nn.Module:
        return nn.Identity() if self.dropout_op is None else self.dropout_op(**self.dropout_op_kwargs)


def factorised_kernels(kernel: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split a plans kernel into the paper's "1x1x3" and "3x3x1" convs: last axis first, then all other axes.

    Axes where the plans kernel is 1 stay 1 in both, so nnU-Net's anisotropic (1, 3, 3) stages remain in-plane.
    """
    kernel = tuple(int(k) for k in kernel)
    return (1,) * (len(kernel) - 1) + kernel[-1:], kernel[:-1] + (1,)


def _linear_mode(dim: int) -> str:
    return "trilinear" if dim == 3 else "bilinear"


class LACBH(nn.Module):
    """LACB-H: factorised conv pair plus a pooled spatial attention gate on F'.

    The attention pool is the paper's avgpool(k=4, s=2, p=1), applied only along axes where the plans kernel is > 1
    and the feature map has >= 4 voxels; other axes are left unpooled. This keeps thin anisotropic axes intact and
    never collapses an axis to a single voxel (InstanceNorm cannot normalise one voxel). The gate is resized back
    with ``size=`` so that odd sizes round-trip exactly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], ops: LayerOps) -> None:
        super().__init__()
        ka, kb = factorised_kernels(kernel_size)
        self.dim = ops.dim
        self.conv_a = nn.Sequential(ops.conv(in_channels, out_channels, ka), ops.norm(out_channels), ops.act())
        self.conv_b = nn.Sequential(ops.conv(out_channels, out_channels, kb), ops.norm(out_channels), ops.act(),
                                    ops.dropout())
        self.attn = nn.Sequential(ops.conv(out_channels, out_channels, (1,) * self.dim), ops.norm(out_channels))
        self.poolable_axes = tuple(int(k) > 1 for k in kernel_size)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pool = [p and s >= 4 for p, s in zip(self.poolable_axes, x.shape[2:])]
        if not any(pool):
            return x
        pool_fn = F.avg_pool3d if self.dim == 3 else F.avg_pool2d
        return pool_fn(x, kernel_size=tuple(4 if p else 1 for p in pool), stride=tuple(2 if p else 1 for p in pool),
                       padding=tuple(1 if p else 0 for p in pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.conv_a(x)
        f2 = self.conv_b(f1)
        a = self.attn(self._pool(f1))
        if a.shape[2:] != f1.shape[2:]:
            a = F.interpolate(a, size=f1.shape[2:], mode=_linear_mode(self.dim), align_corners=False)
        return f2 + torch.sigmoid(a) * f1


class LACBL(nn.Module):
    """LACB-L (bottleneck): depthwise second conv and an unpooled, per-voxel attention gate on F'."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], ops: LayerOps) -> None:
        super().__init__()
        ka, kb = factorised_kernels(kernel_size)
        self.conv_a = nn.Sequential(ops.conv(in_channels, out_channels, ka), ops.norm(out_channels), ops.act())
        self.conv_b = nn.Sequential(ops.conv(out_channels, out_channels, kb, groups=out_channels),
                                    ops.norm(out_channels), ops.act(), ops.dropout())
        self.attn = nn.Sequential(ops.conv(out_channels, out_channels, (1,) * ops.dim), ops.norm(out_channels),
                                  ops.act(), ops.dropout())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.conv_a(x)
        return self.conv_b(f1) + torch.sigmoid(self.attn(f1)) * f1


class UpBlock(nn.Module):
    """conv1x1 -> norm -> act -> dropout -> linear upsampling. The conv runs before upsampling, at low resolution."""

    def __init__(self, in_channels: int, out_channels: int, ops: LayerOps) -> None:
        super().__init__()
        self.dim = ops.dim
        self.proj = nn.Sequential(ops.conv(in_channels, out_channels, (1,) * self.dim), ops.norm(out_channels),
                                  ops.act(), ops.dropout())

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # size= (the skip's size) rather than scale_factor=stride: identical for nnU-Net patch sizes, which are
        # divisible by the total stride, and still aligned when max pooling had to floor an odd size.
        return F.interpolate(self.proj(x), size=tuple(size), mode=_linear_mode(self.dim), align_corners=False)


class LCOVNetEncoder(nn.Module):
    """Max pooling (kernel = stride = plans stride, as in the paper) followed by LACB-H; LACB-L at the bottleneck."""

    def __init__(self, input_channels: int, widths: Sequence[int], kernel_sizes: Sequence[Sequence[int]],
                 strides: Sequence[Sequence[int]], ops: LayerOps) -> None:
        super().__init__()
        pool_op = nn.MaxPool3d if ops.dim == 3 else nn.MaxPool2d
        stages = []
        cin = input_channels
        for s, (width, kernel, stride) in enumerate(zip(widths, kernel_sizes, strides)):
            down = nn.Identity() if all(st == 1 for st in stride) else pool_op(tuple(stride), tuple(stride))
            block_cls = LACBL if s == len(widths) - 1 else LACBH
            stages.append(nn.Sequential(down, block_cls(cin, width, kernel, ops)))
            cin = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class LCOVNetFeatures(NamedTuple):
    """``decoder``: output of each decoder LACB-H (the head inputs), full resolution first, ``n_stages - 1``
    tensors with ``features_per_stage[0], features_per_stage[1], ...`` channels.
    ``bottleneck``: output of the LACB-L bottleneck (``features_per_stage[-1]`` channels)."""

    decoder: list[torch.Tensor]
    bottleneck: torch.Tensor


class LCOVNetDecoder(nn.Module):
    """Up path with one segmentation head per decoder level; ``deep_supervision`` is toggled by nnU-Net's trainer."""

    def __init__(self, widths: Sequence[int], kernel_sizes: Sequence[Sequence[int]], num_classes: int,
                 ops: LayerOps, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        levels = range(len(widths) - 2, -1, -1)  # deepest decoder level first, i.e. in execution order
        self.ups = nn.ModuleList(UpBlock(widths[s + 1], widths[s], ops) for s in levels)
        self.blocks = nn.ModuleList(LACBH(2 * widths[s], widths[s], kernel_sizes[s], ops) for s in levels)
        # Heads are plain biased 1x1 convs regardless of conv_bias, like nnU-Net's seg layers.
        self.seg_layers = nn.ModuleList(ops.conv_op(widths[s], num_classes, 1, bias=True) for s in levels)

    def forward_with_features(self, skips: list[torch.Tensor]
                              ) -> tuple[torch.Tensor | list[torch.Tensor], LCOVNetFeatures]:
        x = skips[-1]
        feats = []
        for up, block, skip in zip(self.ups, self.blocks, skips[-2::-1]):
            x = block(torch.cat([skip, up(x, skip.shape[2:])], dim=1))
            feats.append(x)
        feats = feats[::-1]
        if self.deep_supervision:
            out: torch.Tensor | list[torch.Tensor] = [head(f) for head, f in zip(self.seg_layers[::-1], feats)]
        else:
            out = self.seg_layers[-1](feats[0])  # skip the unused low-resolution heads
        return out, LCOVNetFeatures(feats, skips[-1])

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        return self.forward_with_features(skips)[0]


def _per_stage(value: int | Sequence[int] | Sequence[Sequence[int]], n_stages: int, dim: int,
               name: str) -> list[tuple[int, ...]]:
    """Normalise PlainConvUNet-style int / per-stage int / per-stage-per-axis values to per-stage-per-axis tuples."""
    if isinstance(value, int):
        value = [value] * n_stages
    if len(value) != n_stages:
        raise ValueError(f"{name} must have n_stages={n_stages} entries, got {len(value)}")
    out = [tuple([int(v)] * dim) if isinstance(v, int) else tuple(int(i) for i in v) for v in value]
    if any(len(v) != dim for v in out):
        raise ValueError(f"every {name} entry must have {dim} axes, got {out}")
    return out


def _kwargs(given: dict | None, default: dict) -> dict:
    return dict(default if given is None else given)


class LCOVNet(nn.Module):
    """LCOV-Net whose constructor accepts a PlainConvUNet ``arch_kwargs`` dict from nnU-Net v2 plans.

    Args mirror ``dynamic_network_architectures...PlainConvUNet``:
        input_channels, num_classes: as in nnU-Net.
        n_stages: number of resolution levels (paper: 5). The last stage is the LACB-L bottleneck.
        features_per_stage: width per stage (paper: 32, 64, 128, 256, 256).
        conv_op: nn.Conv3d or nn.Conv2d.
        kernel_sizes: per stage; each kernel is factorised into the "1x1x3" / "3x3x1" pair (``factorised_kernels``).
        strides: per stage; stage ``s`` max-pools by ``strides[s]`` before its block (``strides[0]`` is normally 1).
        conv_bias: bias on all block / up-path convs (paper: True). Heads always have a bias.
        norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs: when omitted, the paper's
            BatchNorm, Dropout(p=0.2) and ReLU6(inplace) are used; when given (plans always give them), the given
            ones are used, and an explicit ``None`` op means no such layer (nnU-Net plans usually give
            ``dropout_op=None``). ``*_kwargs=None`` means ``{}``.
        deep_supervision: see ``forward``; nnU-Net toggles ``self.decoder.deep_supervision`` later.
        n_conv_per_stage, n_conv_per_stage_decoder, nonlin_first: accepted for plans compatibility and ignored;
            each level has exactly one LACB and norm always precedes the nonlinearity.
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        n_stages: int = 5,
        features_per_stage: int | Sequence[int] = (32, 64, 128, 256, 256),
        conv_op: type[nn.Module] = nn.Conv3d,
        kernel_sizes: int | Sequence[int] | Sequence[Sequence[int]] = 3,
        strides: int | Sequence[int] | Sequence[Sequence[int]] = (1, 2, 2, 2, 2),
        n_conv_per_stage: int | Sequence[int] | None = None,
        n_conv_per_stage_decoder: int | Sequence[int] | None = None,
        conv_bias: bool = True,
        norm_op: type[nn.Module] | None = PAPER_DEFAULT,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[nn.Module] | None = PAPER_DEFAULT,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = PAPER_DEFAULT,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
    ) -> None:
        super().__init__()
        if conv_op not in _CONV_DIMS:
            raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")
        if n_stages < 2:
            raise ValueError("LCOV-Net needs at least 2 stages (one LACB-H level and the bottleneck)")
        dim = _CONV_DIMS[conv_op]
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        if len(features_per_stage) != n_stages:
            raise ValueError(f"features_per_stage must have {n_stages} entries, got {len(features_per_stage)}")
        widths = [int(w) for w in features_per_stage]
        kernels = _per_stage(kernel_sizes, n_stages, dim, "kernel_sizes")
        stride_list = _per_stage(strides, n_stages, dim, "strides")

        paper_norm = nn.BatchNorm3d if dim == 3 else nn.BatchNorm2d
        ops = LayerOps(
            conv_op=conv_op,
            norm_op=paper_norm if norm_op is PAPER_DEFAULT else norm_op,
            norm_op_kwargs=_kwargs(norm_op_kwargs, {}),
            dropout_op=nn.Dropout if dropout_op is PAPER_DEFAULT else dropout_op,
            dropout_op_kwargs=_kwargs(dropout_op_kwargs, {"p": 0.2} if dropout_op is PAPER_DEFAULT else {}),
            nonlin=nn.ReLU6 if nonlin is PAPER_DEFAULT else nonlin,
            nonlin_kwargs=_kwargs(nonlin_kwargs, {"inplace": True} if nonlin is PAPER_DEFAULT else {}),
            conv_bias=conv_bias,
        )
        self.encoder = LCOVNetEncoder(input_channels, widths, kernels, stride_list, ops)
        self.decoder = LCOVNetDecoder(widths, kernels, num_classes, ops, deep_supervision)

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor | list[torch.Tensor], LCOVNetFeatures]:
        """Logits: with ``decoder.deep_supervision`` a list of ``n_stages - 1`` tensors, full resolution first
        (scales 1, 1/strides[1], 1/(strides[1]*strides[2]), ... relative to stage 0, matching nnU-Net's DS
        targets); otherwise one full-resolution tensor.

        ``return_features=True`` returns ``(logits, LCOVNetFeatures)`` instead; use this form (not
        ``forward_with_features``) through DDP / torch.compile wrappers so their forward hooks run.
        """
        out, feats = self.decoder.forward_with_features(self.encoder(x))
        return (out, feats) if return_features else out

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor], LCOVNetFeatures]:
        """``(logits, LCOVNetFeatures(decoder=[full-res first, ...], bottleneck=tensor))``; logits as in forward."""
        return self.forward(x, return_features=True)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init like dynamic_network_architectures' InitWeights_He(1e-2); for ``network.apply``."""
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
