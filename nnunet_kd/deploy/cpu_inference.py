"""Fast CPU inference for narrow networks.

nnU-Net's sliding-window predictor runs one tile at a time. For a batch of one with few channels, PyTorch's CPU
convolution heuristic picks its slow im2col path (`slow_conv3d_forward`) instead of oneDNN: a 4-32-channel student
then runs barely faster than its teacher (measured here: 0.26 s vs 0.04 s per 32x40x40 tile for the same student,
identical outputs up to float rounding). Routing those calls to oneDNN gives the speed a small student should have.
"""
from __future__ import annotations

import torch
from torch import nn


def _use_onednn(x: torch.Tensor, conv: nn.Module) -> bool:
    # only where the heuristic goes wrong and oneDNN is a drop-in: CPU float32 inference, zero padding. Not while
    # torch.compile traces the network (nnUNet_compile=t): dynamo cannot trace the raw oneDNN op on CPU tensors
    # ("itensor_view_from_dense expects CPU tensor input"), and the compiled graph picks its own convolution kernels
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class _OneDNNForward:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(x, self):
            return torch.ops.aten.mkldnn_convolution(x.contiguous(), self.weight.contiguous(), self.bias,
                                                     self.padding, self.stride, self.dilation, self.groups)
        return super().forward(x)


class OneDNNConv2d(_OneDNNForward, nn.Conv2d):
    pass


class OneDNNConv3d(_OneDNNForward, nn.Conv3d):
    pass


def use_onednn_convolutions(network: nn.Module) -> nn.Module:
    """Switch the network's plain Conv2d/Conv3d layers to the oneDNN path for CPU inference, in place.

    Parameters, state-dict keys and training behaviour are unchanged, so checkpoints load either way.
    """
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDNNConv3d
        elif type(module) is nn.Conv2d:
            module.__class__ = OneDNNConv2d
    return network


def use_stock_convolutions(network: nn.Module) -> nn.Module:
    """Undo `use_onednn_convolutions` in place, e.g. before tracing the network for export."""
    for module in network.modules():
        if type(module) is OneDNNConv3d:
            module.__class__ = nn.Conv3d
        elif type(module) is OneDNNConv2d:
            module.__class__ = nn.Conv2d
    return network


def build_network_with_onednn(plans_manager, configuration_manager, num_input_channels: int,
                              num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
    """nnU-Net's network from the plans (nnUNetTrainer.build_network_architecture), with oneDNN convolutions.

    Trainers use it as their static `build_network_architecture`, so stock `nnUNetv2_predict` rebuilds the fast
    network from the trainer class and plans alone.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return use_onednn_convolutions(nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))
