"""Command-line tools around nnU-Net: the CLI, the demo, benchmarks, the KD study and its report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# the trainer classes of this source tree (setup_scripts/install.sh installs nnunet-kd from it), for nnU-Net's
# nnUNet_extTrainer when the user has not set it
TRAINERS_FOLDER = Path(__file__).resolve().parents[2] / "trainers"


def ensure_ext_trainer() -> str:
    """nnUNet_extTrainer in this process: the user's, or this package's trainers when unset. nnU-Net finds trainer
    classes outside its own package only through it, and the commands that load or train this package's models must
    work without the user setting it up."""
    if not os.environ.get("nnUNet_extTrainer"):
        os.environ["nnUNet_extTrainer"] = str(TRAINERS_FOLDER)
    return os.environ["nnUNet_extTrainer"]


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
