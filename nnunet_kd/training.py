"""The pieces of nnUNetTrainer.train_step that every trainer here repeats around its own loss."""
from __future__ import annotations

import torch


def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """The batch's data and target (one tensor, or one per deep-supervision output) on `device`."""
    data = batch["data"].to(device, non_blocking=True)
    target = batch["target"]
    target = [t.to(device, non_blocking=True) for t in target] if isinstance(target, list) \
        else target.to(device, non_blocking=True)
    return data, target


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      grad_scaler: torch.amp.GradScaler | None, max_norm: float = 12.0) -> None:
    """nnU-Net's update: gradient scaling on CUDA, the gradient norm clipped at 12, over everything the optimiser
    trains (a student network, or also a second network or a master network the student is a slice of)."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, max_norm)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, max_norm)
        optimizer.step()
