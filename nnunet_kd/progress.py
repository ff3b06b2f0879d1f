"""nnU-Net's per-epoch logger, extended with the loss parts of a distillation run."""
from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class KDLocalLogger(LocalLogger):
    """Logs extra per-epoch series and draws them in progress_kd.png, next to nnU-Net's own progress.png."""

    def __init__(self, extra_keys: Sequence[str], verbose: bool = False) -> None:
        super().__init__(verbose)
        self.extra_keys = list(extra_keys)
        for key in self.extra_keys:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict) -> None:
        missing = [k for k in self.extra_keys if k not in checkpoint]
        if missing:
            raise RuntimeError(f"This checkpoint has no logged {missing}; it was not written by this trainer. "
                               f"Resume with the trainer that wrote it.")
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder: str) -> None:
        # nnU-Net's progress.png as it is, and the loss parts in progress_kd.png beside it: stacking them into one
        # image cost ~6 s of PNG decoding and encoding per epoch on a CPU, against ~1 s for the two files
        super().plot_progress_png(output_folder)
        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        fig, ax = plt.subplots(1, 1, figsize=(15, 6))
        for key in self.extra_keys:
            ax.plot(range(epochs), self.my_fantastic_logging[key][:epochs], ls="-", label=key, linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss part")
        ax.legend(loc=(0, 1), ncol=len(self.extra_keys))
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress_kd.png"))
        plt.close(fig)
