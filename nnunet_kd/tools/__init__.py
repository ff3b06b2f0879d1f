"""Command-line tools around nnU-Net: the CLI, the demo, benchmarks, the KD study and its report."""
from pathlib import Path

# the trainer classes of this source tree (setup_scripts/install.sh installs nnunet-kd from it), for nnU-Net's
# nnUNet_extTrainer when the user has not set it
TRAINERS_FOLDER = Path(__file__).resolve().parents[2] / "trainers"
