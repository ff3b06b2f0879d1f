"""Command-line tools around nnU-Net: the CLI, the demo, benchmarks, the KD study and its report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from nnunet_kd.core.settings import TRAINERS_FOLDER


def command_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for nnU-Net's and this package's commands run as subprocesses."""
    env = dict(os.environ)
    env.update({
        # the commands live next to this Python, also when its environment is not activated
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "nnUNet_extTrainer": env.get("nnUNet_extTrainer") or str(TRAINERS_FOLDER),
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })
    return env
