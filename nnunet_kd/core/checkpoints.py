"""nnU-Net checkpoint files: read, their weights counted, their contents fingerprinted; and the parameters of a
network counted the same way."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def load_checkpoint(path: str | Path) -> dict:
    # nnU-Net checkpoints hold plain Python objects (logging, init args) besides tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def num_parameters(module: nn.Module) -> int:
    """Parameters of a network (or any module), as nnU-Net's networks and the papers count them."""
    return sum(p.numel() for p in module.parameters())


def count_weights(state_dict: dict) -> int:
    """Number of distinct weights in a state dict.

    nnU-Net's U-Net decoders keep a reference to the encoder, so its weights appear under two keys; counting storages
    once gives the same number as `sum(p.numel() for p in network.parameters())`.
    """
    seen, total = set(), 0
    for tensor in state_dict.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
