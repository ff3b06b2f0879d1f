"""Optional seeding of a training run (nnU-Net itself does not seed)."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

ENV_SEED = "nnUNet_KD_seed"


def seed_from_environment(environ=os.environ) -> int | None:
    """Seed Python, NumPy and torch from `nnUNet_KD_seed` if it is set; return the seed.

    Two runs with the same seed and architecture start from the same weights, which makes KD-vs-no-KD comparisons
    paired. nnU-Net's augmentation workers and cuDNN are not made deterministic, so runs are not bit-identical.
    """
    value = environ.get(ENV_SEED)
    if not value:
        return None
    seed = int(value)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
