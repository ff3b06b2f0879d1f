"""Tests for the LCOV-Net student architecture (CPU, small shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_kd.architectures.lcovnet import (
    LACBH,
    LACBL,
    LayerOps,
    LCOVNet,
    LCOVNetFeatures,
    factorised_kernels,
)

PAPER_PARAMS = 2_785_764  # paper reports ~2.79 M


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_all_params_get_grad(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def _ds_shapes(patch: tuple[int, ...], strides: list[list[int]]) -> list[tuple[int, ...]]:
    """Expected DS output sizes the way nnU-Net derives its DS scales: cumprod of the strides, last one dropped."""
    scales = np.cumprod(np.vstack(strides), axis=0)[:-1]
    return [tuple(int(p // s) for p, s in zip(patch, sc)) for sc in scales]


def test_factorised_kernels() -> None:
    assert factorised_kernels((3, 3, 3)) == ((1, 1, 3), (3, 3, 1))
    assert factorised_kernels((1, 3, 3)) == ((1, 1, 3), (1, 3, 1))
    assert factorised_kernels((3, 3)) == ((1, 3), (3, 1))


@pytest.mark.parametrize("block_cls", [LACBH, LACBL])
def test_blocks_shape_and_grad_3d(block_cls: type[nn.Module]) -> None:
    block = block_cls(4, 8, (3, 3, 3), LayerOps())
    x = torch.randn(2, 4, 8, 10, 6, requires_grad=True)
    y = block(x)
    assert y.shape == (2, 8, 8, 10, 6)
    y.square().mean().backward()
    assert x.grad is not None
    _assert_all_params_get_grad(block)


@pytest.mark.parametrize("block_cls", [LACBH, LACBL])
def test_blocks_shape_and_grad_2d(block_cls: type[nn.Module]) -> None:
    ops = LayerOps(conv_op=nn.Conv2d, norm_op=nn.BatchNorm2d)
    block = block_cls(3, 6, (3, 3), ops)
    y = block(torch.randn(2, 3, 12, 9))
    assert y.shape == (2, 6, 12, 9)
    y.square().mean().backward()
    _assert_all_params_get_grad(block)


@pytest.mark.parametrize("spatial", [(1, 3, 5), (2, 2, 2), (5, 7, 4), (16, 4, 3)])
def test_lacbh_attention_degrades_on_small_or_odd_maps(spatial: tuple[int, int, int]) -> None:
    # InstanceNorm in train mode raises on a single-voxel map, so this also checks the pool never collapses one.
    ops = LayerOps(norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                   nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    block = LACBH(2, 4, (3, 3, 3), ops).train()
    assert block(torch.randn(1, 2, *spatial)).shape == (1, 4, *spatial)


def test_lacbh_does_not_pool_along_kernel1_axis() -> None:
    block = LACBH(2, 4, (1, 3, 3), LayerOps())
    pooled = block._pool(torch.randn(1, 4, 8, 8, 8))
    assert pooled.shape[2:] == (8, 4, 4)


def test_paper_parameter_count() -> None:
    net = LCOVNet(1, 17, n_stages=5, features_per_stage=[32, 64, 128, 256, 256], conv_op=nn.Conv3d,
                  kernel_sizes=[[3, 3, 3]] * 5, strides=[[1, 1, 1]] + [[2, 2, 2]] * 4)
    n = _n_params(net)
    assert n == PAPER_PARAMS
    assert abs(n - 2.79e6) / 2.79e6 < 0.02


def test_paper_defaults_and_plans_overrides() -> None:
    paper = LCOVNet(1, 2, features_per_stage=[4, 8, 8, 8, 8])
    types = {type(m) for m in paper.modules()}
    assert {nn.BatchNorm3d, nn.ReLU6, nn.Dropout} <= types
    assert all(m.p == 0.2 for m in paper.modules() if isinstance(m, nn.Dropout))

    plans = LCOVNet(1, 2, features_per_stage=[4, 8, 8, 8, 8], norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, nonlin=nn.LeakyReLU,
                    nonlin_kwargs={"inplace": True})
    types = {type(m) for m in plans.modules()}
    assert nn.InstanceNorm3d in types and nn.LeakyReLU in types
    assert not types & {nn.BatchNorm3d, nn.ReLU6, nn.Dropout, nn.Dropout3d}


def _check_net(net: LCOVNet, patch: tuple[int, ...], strides: list[list[int]], num_classes: int) -> None:
    x = torch.randn(2, 1, *patch)
    expected = _ds_shapes(patch, strides)
    net.decoder.deep_supervision = True
    out = net(x)
    assert isinstance(out, list) and len(out) == len(strides) - 1
    assert [tuple(o.shape) for o in out] == [(2, num_classes, *s) for s in expected]
    sum(o.mean() for o in out).backward()
    _assert_all_params_get_grad(net)

    net.decoder.deep_supervision = False
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes, *patch)


def test_network_3d_isotropic() -> None:
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    net = LCOVNet(1, 3, 5, [4, 8, 16, 16, 16], nn.Conv3d, 3, strides, deep_supervision=True)
    _check_net(net, (32, 32, 32), strides, 3)


def test_network_3d_anisotropic() -> None:
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
    net = LCOVNet(1, 2, 4, [4, 8, 16, 16], nn.Conv3d, kernels, strides, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True})
    _check_net(net, (8, 32, 32), strides, 2)


def test_network_2d() -> None:
    strides = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
    net = LCOVNet(1, 4, 5, [4, 8, 16, 32, 32], nn.Conv2d, [[3, 3]] * 5, strides, deep_supervision=True)
    _check_net(net, (64, 48), strides, 4)


def test_network_odd_nnunet_patch() -> None:
    # (20, 48, 40) with strides that end in a (5, 3, 5) bottleneck.
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 1]]
    net = LCOVNet(1, 2, 5, [4, 8, 8, 16, 16], nn.Conv3d, 3, strides, norm_op=nn.InstanceNorm3d,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, nonlin=nn.LeakyReLU)
    _check_net(net, (20, 48, 40), strides, 2)


def test_network_non_divisible_patch_keeps_full_resolution() -> None:
    net = LCOVNet(1, 2, 4, [4, 8, 8, 8], nn.Conv3d, 3, [1, 2, 2, 2])
    assert net(torch.randn(1, 1, 21, 19, 13)).shape == (1, 2, 21, 19, 13)


def test_forward_with_features() -> None:
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 3
    widths = [4, 8, 16, 24]
    net = LCOVNet(1, 2, 4, widths, nn.Conv3d, 3, strides, deep_supervision=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    logits, feats = net.forward_with_features(x)
    assert isinstance(feats, LCOVNetFeatures)
    assert [tuple(f.shape) for f in feats.decoder] == [(1, w, *s) for w, s in zip(widths, _ds_shapes(x.shape[2:],
                                                                                                       strides))]
    assert feats.bottleneck.shape == (1, 24, 2, 2, 2)
    assert len(logits) == 3
    same_logits, _ = net(x, return_features=True)
    torch.testing.assert_close(same_logits[0], logits[0])
    net.decoder.deep_supervision = False
    logits, feats = net.forward_with_features(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 2, 16, 16, 16)
    assert len(feats.decoder) == 3


def test_get_network_from_plans() -> None:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = {
        "n_stages": 5,
        "features_per_stage": [8, 16, 32, 32, 32],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    net = get_network_from_plans("nnunet_kd.architectures.lcovnet.LCOVNet", arch_kwargs,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], input_channels=2,
                                 output_channels=3, allow_init=True, deep_supervision=True)
    assert isinstance(net, LCOVNet) and net.decoder.deep_supervision is True
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert all(c.bias is not None and torch.count_nonzero(c.bias) == 0 for c in convs)  # He init zeroes biases

    patch = (16, 32, 32)
    out = net(torch.randn(2, 2, *patch))
    assert [tuple(o.shape) for o in out] == [(2, 3, *s) for s in _ds_shapes(patch, arch_kwargs["strides"])]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    assert net(torch.randn(2, 2, *patch)).shape == (2, 3, *patch)
