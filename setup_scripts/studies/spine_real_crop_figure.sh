#!/usr/bin/env bash
# Issue #28's picture of a real CT crop: the mid-sagittal slice (head up) with the reference vertebrae and those each
# two-stage pipeline found, one colour per vertebra (projected over left-right, so that parts off the midline show).
# Usage: bash setup_scripts/studies/spine_real_crop_figure.sh CT REFERENCE_MASK OUTPUT.png NAME=PREDICTION ...
#   e.g. the TPTBox crop laid out by spine_smoke_tptbox.sh and predicted with `nnunet_kd spine predict`
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/python" ] && export PATH="$repo/.venv/bin:$PATH"
python - "$@" <<'PY'
import sys

import matplotlib
import numpy as np
import SimpleITK as sitk

from nnunet_kd.spine.verse import canonical

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ct_path, reference_path, output, *runs = sys.argv[1:]
panels = [("reference", reference_path)] + [tuple(run.split("=", 1)) for run in runs]
ct = canonical(sitk.ReadImage(ct_path))
image = sitk.GetArrayFromImage(ct)  # (z head up, y posterior, x left)
x = image.shape[2] // 2
spacing = ct.GetSpacing()
figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
for axis, (name, path) in zip(np.atleast_1d(axes), panels):
    labels = sitk.GetArrayFromImage(canonical(sitk.Resample(sitk.ReadImage(path), sitk.ReadImage(ct_path),
                                                            sitk.Transform(), sitk.sitkNearestNeighbor, 0)))
    axis.imshow(image[:, :, x], cmap="gray", origin="lower", vmin=-200, vmax=1200,
                aspect=spacing[2] / spacing[1])
    found = [int(v) for v in np.unique(labels) if v]
    ranks = np.zeros(max(found, default=0) + 1, int)
    ranks[found] = np.arange(1, len(found) + 1)  # one colour per vertebra, in the order of their labels
    shown = np.ma.masked_equal(ranks[labels].max(axis=2), 0)
    axis.imshow(shown, cmap="tab10", origin="lower", alpha=0.5, vmin=0, vmax=10, aspect=spacing[2] / spacing[1])
    axis.set_title(f"{name}\n{len(found)} labelled", fontsize=9)
    axis.axis("off")
figure.tight_layout()
figure.savefig(output, dpi=120)
print(f"wrote {output}")
PY
