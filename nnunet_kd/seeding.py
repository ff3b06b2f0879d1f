"""Optional seeding of a training run (nnU-Net itself does not seed)."""
from __future__ import annotations

import os
import random
from collections.abc import Mapping

import numpy as np
import torch

from nnunet_kd.settings import RunEnvironment


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
