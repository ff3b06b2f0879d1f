"""The oneDNN convolution path for CPU inference: same outputs, same checkpoints, and really not the slow path."""
from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.profiler import ProfilerActivity, profile

from nnunet_kd.deploy.cpu_inference import OneDNNConv2d, OneDNNConv3d, use_onednn_convolutions


def _narrow_unet(dim: int) -> PlainConvUNet:
    torch.manual_seed(0)
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, 3, 2, True, norm, {"affine": True}, None, None,
                         nn.LeakyReLU, {"inplace": True}).eval()


def _ops(network, x) -> set[str]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        network(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("dim, shape", [(3, (1, 1, 16, 20, 24)), (2, (1, 1, 40, 48))])
def test_same_outputs_and_state_dict(dim, shape):
    network = _narrow_unet(dim)
    reference = copy.deepcopy(network)
    use_onednn_convolutions(network)
    assert any(isinstance(m, (OneDNNConv2d, OneDNNConv3d)) for m in network.modules())
    assert network.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(network(x), reference(x), atol=1e-4)


def test_batch_of_one_avoids_the_slow_convolution():
    network, x = _narrow_unet(3), torch.randn(1, 1, 16, 20, 24)
    assert "aten::slow_conv3d_forward" in _ops(network, x), "premise: PyTorch's heuristic picks the slow path here"
    ops = _ops(use_onednn_convolutions(network), x)
    assert "aten::slow_conv3d_forward" not in ops and "aten::mkldnn_convolution" in ops


def test_training_keeps_pytorchs_own_path_and_gradients():
    network, reference = _narrow_unet(3).train(), _narrow_unet(3).train()
    use_onednn_convolutions(network)
    x = torch.randn(2, 1, 16, 20, 24)
    network(x).sum().backward()
    reference(x).sum().backward()
    for (name, p), q in zip(network.named_parameters(), reference.parameters()):
        if q.grad is None:  # the lower-resolution heads are unused without deep supervision
            assert p.grad is None, name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_torch_compile_traces_the_stock_convolution():
    # nnUNet_compile=t: dynamo cannot trace the raw oneDNN op on CPU tensors ("itensor_view_from_dense expects CPU
    # tensor input"), so while compiling the network takes PyTorch's own convolution. backend="eager" runs dynamo's
    # tracing, where the error was, without inductor's slow C++ build
    network = use_onednn_convolutions(_narrow_unet(3))
    x = torch.randn(1, 1, 16, 20, 24)
    with torch.no_grad():
        expected = network(x)
        compiled = torch.compile(network, backend="eager")(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-5)
