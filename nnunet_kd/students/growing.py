"""Width slicing of one master U-Net, for the growing teacher-assistant trainer (this project's design, inspired by
Xu et al. 2021; README, "Growing teacher-assistant KD").

One master network holds the weights at the assistant's maximum width. A narrower network of the same architecture
(the student, or the assistant at its current width) is the slice made of the first channels of every layer; it runs
on sliced views of the master weights, so gradients reach the master and one
optimiser trains both. Decoder convolutions whose input is the concatenation `[upsampled, skip]` are sliced per half.

Growing the assistant from widths `a` to `b` silences the channels it gains: their fan-out weights (the input
columns that read them in the next layers) are set to zero, and so is their optimiser state, so the assistant
computes exactly what it computed before the growth, and the new channels start learning from there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_kd.core.settings import KDConfigurationError

# nnU-Net's U-Nets whose decoder (UNetDecoder) concatenates [transposed-conv output, skip] before each decoder stage
SLICEABLE_ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")


@dataclass(frozen=True)
class GrowthStage:
    start_epoch: int
    widths: tuple[int, ...]


def growth_schedule(student_widths: Sequence[int], max_widths: Sequence[int], num_stages: int,
                    num_epochs: int) -> list[GrowthStage]:
    """`num_stages` assistant widths, evenly spaced from just above the student's to `max_widths`; stage k starts at
    epoch floor(k · num_epochs / num_stages)."""
    if num_stages < 1:
        raise KDConfigurationError(f"The assistant needs at least one growth stage, got {num_stages}")
    stages = []
    for k in range(num_stages):
        fraction = (k + 1) / num_stages
        widths = tuple(max(s, round(s + (m - s) * fraction)) for s, m in zip(student_widths, max_widths))
        stages.append(GrowthStage(math.floor(k * num_epochs / num_stages), widths))
    return stages


def stage_at(schedule: Sequence[GrowthStage], epoch: int) -> int:
    """The last stage that has started by `epoch` (several stages may start at once on very short schedules)."""
    return max(k for k, stage in enumerate(schedule) if stage.start_epoch <= epoch)


def check_sliceable(network: nn.Module) -> None:
    if type(network).__name__ not in SLICEABLE_ARCHITECTURES:
        raise KDConfigurationError(
            f"The growing assistant slices nnU-Net's U-Nets ({', '.join(SLICEABLE_ARCHITECTURES)}); the student plans "
            f"use {type(network).__name__}. Make student plans with `nnunet_kd student-plans --arch plain` or from "
            f"ResEnc plans.")


def _input_dims(network: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension of that weight that indexes input channels (conv: 1, transposed conv: 0)."""
    names = {id(p): n for n, p in network.named_parameters()}
    return {names[id(m.weight)]: 0 if m.transposed else 1
            for m in network.modules() if isinstance(m, _ConvNd) and id(m.weight) in names}


def _concatenating_convs(network: nn.Module) -> set[str]:
    """Weights of the first convolution of every decoder stage: their input is `cat([upsampled, skip])`."""
    names = {id(p): n for n, p in network.named_parameters()}
    return {names[id(next(m for m in stage.modules() if isinstance(m, _ConvNd)).weight)]
            for stage in network.decoder.stages}


class ChannelSlice:
    """A narrower network of the master's architecture whose weights are the first channels of the master's.

    Buffers (BatchNorm running statistics) are slices of the master's too, unless `own_buffers`: then the narrow
    network keeps and updates its own. The student needs that: the assistant's forward pass updates the master's
    statistics of the student's channels with the assistant's activations, so shared buffers would export statistics
    of another network (and count `num_batches_tracked` twice per step).
    """

    def __init__(self, master: nn.Module, narrow: nn.Module, own_buffers: bool = False):
        check_sliceable(master)
        check_sliceable(narrow)
        self.master, self.narrow, self.own_buffers = master, narrow, own_buffers
        self.input_dims = _input_dims(master)
        concatenating = _concatenating_convs(master)
        master_tensors = _tensors(master, own_buffers)
        narrow_tensors = _tensors(narrow, own_buffers)
        if set(master_tensors) != set(narrow_tensors):
            raise ValueError("master and narrow network are not the same architecture")
        # name -> per dimension: None (whole dimension) or the master indices that make up the narrow tensor
        self.indices: dict[str, list[torch.Tensor | None]] = {}
        for name, big in master_tensors.items():
            small = narrow_tensors[name]
            if big.dim() != small.dim() or any(s > b for s, b in zip(small.shape, big.shape)):
                raise ValueError(f"{name}: {tuple(small.shape)} is not a slice of {tuple(big.shape)}")
            per_dim: list[torch.Tensor | None] = []
            for dim, (b, s) in enumerate(zip(big.shape, small.shape)):
                if b == s:
                    per_dim.append(None)
                elif name in concatenating and dim == self.input_dims[name]:
                    if b % 2 or s % 2:
                        raise ValueError(f"{name}: concatenated input of odd width")
                    per_dim.append(torch.cat([torch.arange(s // 2), b // 2 + torch.arange(s // 2)]))
                else:
                    per_dim.append(torch.arange(s))
            self.indices[name] = per_dim
        # every place the narrow network holds a tensor (tied weights sit in several modules), by the tensor's name
        canonical = {id(t): name for name, t in narrow_tensors.items()}
        swapped = [*narrow.named_parameters(remove_duplicate=False),
                   *([] if own_buffers else narrow.named_buffers(remove_duplicate=False))]
        self._slots = [(narrow.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], canonical[id(t)])
                       for path, t in swapped]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The narrow network's parameters and buffers as differentiable slices of the master's."""
        sliced = {}
        for name, tensor in _tensors(self.master, self.own_buffers).items():
            for dim, index in enumerate(self.indices[name]):
                if index is None:
                    continue
                if index[-1] == len(index) - 1:  # the first channels: a view, no copy
                    tensor = tensor.narrow(dim, 0, len(index))
                else:
                    tensor = tensor.index_select(dim, index.to(tensor.device))
            sliced[name] = tensor
        return sliced

    def __call__(self, *args, **kwargs):
        """Run the narrow architecture on the master's sliced weights (gradients go to the master)."""
        # swapped in by hand rather than with torch.func.functional_call, which (torch 2.14) leaves tied weights of
        # nnU-Net's networks (conv.weight is all_modules.0.weight) pointing at the call's tensors afterwards
        sliced = self.tensors()
        originals = []
        try:
            for module, attribute, name in self._slots:
                store = module._parameters if attribute in module._parameters else module._buffers
                originals.append((store, attribute, store[attribute]))
                store[attribute] = sliced[name]
            return self.narrow(*args, **kwargs)
        finally:
            for store, attribute, original in reversed(originals):
                store[attribute] = original

    @torch.no_grad()
    def copy_into_narrow(self) -> nn.Module:
        """Make the narrow network a standalone copy of the slice (for validation, checkpoints and inference)."""
        own = _tensors(self.narrow, self.own_buffers)
        for name, tensor in self.tensors().items():
            own[name].copy_(tensor)
        return self.narrow

    def input_channels(self, name: str) -> torch.Tensor | None:
        """Master indices of the input channels the narrow network reads in weight `name` (None: all of them)."""
        return self.indices[name][self.input_dims[name]]


class SlicedNetworks(nn.Module):
    """The master network as one module whose forward runs narrow networks on slices of its weights.

    This is what DDP wraps: every slice's gradient lands on the master's parameters, which keep their shapes whatever
    the narrow networks' widths, and a call through the wrapper is what lets DDP reduce those gradients (the narrow
    networks' own parameters are swapped out while they run, so they must not be in the wrapper).
    """

    def __init__(self, master: nn.Module) -> None:
        super().__init__()
        self.master = master

    def forward(self, x: torch.Tensor, *slices: ChannelSlice) -> list:
        return [narrow(x) for narrow in slices]


def _tensors(network: nn.Module, parameters_only: bool = False) -> dict[str, torch.Tensor]:
    return {**dict(network.named_parameters()), **({} if parameters_only else dict(network.named_buffers()))}


@torch.no_grad()
def silence_added_channels(before: ChannelSlice, after: ChannelSlice,
                           optimizer: torch.optim.Optimizer | None = None) -> int:
    """Zero the fan-out of the channels `after` has and `before` lacks, in the weights and in the optimiser state.

    The wider network then computes exactly what the narrower one did: each added channel is only read through the
    zeroed input columns (per-channel norms and residual sums keep channels apart). Returns how many weight entries
    were zeroed.
    """
    parameters = dict(after.master.named_parameters())
    zeroed = 0
    for name, dim in after.input_dims.items():
        weight = parameters[name]
        everything = torch.arange(weight.shape[dim])
        new, old = after.input_channels(name), before.input_channels(name)
        new = everything if new is None else new
        old = everything if old is None else old
        added = new[~torch.isin(new, old)].to(weight.device)
        if added.numel() == 0:
            continue
        weight.index_fill_(dim, added, 0)
        zeroed += weight.numel() // weight.shape[dim] * added.numel()
        state = optimizer.state.get(weight, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                value.index_fill_(dim, added, 0)
    return zeroed
