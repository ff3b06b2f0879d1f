"""nnU-Net's per-epoch logger, extended with the loss parts of a distillation run."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import matplotlib

matplotlib.use("agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class KDLocalLogger(LocalLogger):
    """Logs extra per-epoch series and draws them in a panel below nnU-Net's own progress.png panels."""

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
        with tempfile.TemporaryDirectory() as tmp:
            # nnU-Net's three panels first, unchanged, then ours, stacked into one progress.png
            super().plot_progress_png(tmp)
            base = mpimg.imread(os.path.join(tmp, "progress.png"))
            epochs = min(len(v) for v in self.my_fantastic_logging.values())
            fig, ax = plt.subplots(1, 1, figsize=(30, 18), dpi=plt.rcParams["figure.dpi"])
            for key in self.extra_keys:
                ax.plot(range(epochs), self.my_fantastic_logging[key][:epochs], ls="-", label=key, linewidth=4)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss part")
            ax.legend(loc=(0, 1))
            plt.tight_layout()
            fig.savefig(os.path.join(tmp, "kd.png"))
            plt.close(fig)
            extra = mpimg.imread(os.path.join(tmp, "kd.png"))
            width = min(base.shape[1], extra.shape[1])
            plt.imsave(os.path.join(output_folder, "progress.png"),
                       np.concatenate([base[:, :width, :3], extra[:, :width, :3]], axis=0))
