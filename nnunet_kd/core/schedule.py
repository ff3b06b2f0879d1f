"""A run's start from the environment: its seed, and its training length for schedules that no named
`<trainer>_<schedule>` class covers.

`nnUNet_KD_seed` seeds Python, NumPy and torch (nnU-Net itself does not seed).

`nnUNet_KD_num_epochs`, `nnUNet_KD_iterations_per_epoch` and `nnUNet_KD_val_iterations_per_epoch` set nnU-Net's
`num_epochs`, `num_iterations_per_epoch` and `num_val_iterations_per_epoch` for this package's trainers
(nnUNetTrainerStudent and every KD trainer); `nnunet_kd study --epochs E --iterations I` uses them so that a study
can train any length without a class per length. A named schedule class (`_demo`, `_20epochs`, ...) sets its own
length after this and wins.
"""
from __future__ import annotations

import os
import random
from collections.abc import Mapping

import numpy as np
import torch

from nnunet_kd.core.settings import RunEnvironment

# named schedules: `<trainer>_<name>` classes (trainers/nnUNetTrainer_schedules.py) set these attributes after
# nnUNetTrainer.__init__
SCHEDULES = {
    "debug": {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2, "save_every": 1},
    "demo": {"num_epochs": 6, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 4},
    **{f"{n}epochs": {"num_epochs": n} for n in (5, 10, 20, 50, 100, 250)},
    **{f"{e}x{i}": {"num_epochs": e, "num_iterations_per_epoch": i, "num_val_iterations_per_epoch": 10}
       for e in (20, 40, 60, 100) for i in (50,)},
}


def apply_schedule_from_environment(trainer, environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Set the trainer's training length from the schedule variables; returns what was set."""
    schedule = dict(RunEnvironment.read(environ).schedule)
    for attribute, value in schedule.items():
        setattr(trainer, attribute, value)
    return schedule


def split_schedule(trainer_name: str) -> tuple[str, str]:
    """'nnUNetTrainerKDLogits_T4_demo' -> ('nnUNetTrainerKDLogits_T4', 'demo'); no named schedule -> (name, '')."""
    base, _, suffix = trainer_name.rpartition("_")
    return (base, suffix) if base and suffix in SCHEDULES else (trainer_name, "")


def seed_from_environment(environ: Mapping[str, str] = os.environ) -> int | None:
    """Seed Python, NumPy and torch from `nnUNet_KD_seed` if it is set; return the seed.

    Two runs with the same seed and architecture start from the same weights, which makes KD-vs-no-KD comparisons
    paired. nnU-Net's augmentation workers and cuDNN are not made deterministic, so runs are not bit-identical.
    """
    seed = RunEnvironment.read(environ).seed
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return seed
