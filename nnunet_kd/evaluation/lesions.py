"""What a reader of a lesion segmentation (the FLAIR abnormality of a glioma, say) looks at beside Dice.

Per case, for one label against the reference:
- false-positive volume on lesion-free slices (mL): lesion predicted on slices where the reference has none. A
  reader sees each such blob as a finding to rule out, however good the Dice on the lesion itself; Dice hardly moves
  for it when the lesion is large. Slices run along the first array axis (z as SimpleITK reads the image: the axial
  slices of an axially acquired scan, and the slices a 2d nnU-Net predicts one by one).
- lesion-free slices with any predicted lesion, and how many lesion-free slices there are;
- HD95 (mm): the 95th percentile of the symmetric surface distances, NaN where either mask is empty (a missed
  lesion or a false alarm, counted on their own: `missed`, `false_alarm`);
- Dice (NaN where both masks are empty, as nnU-Net scores it), reference and predicted volume (mL).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from nnunet_kd.evaluation.surface import hd95

SCORES = ("dice", "hd95_mm", "fp_ml_lesion_free_slices", "lesion_free_slices_with_fp", "lesion_free_slices",
          "reference_ml", "predicted_ml", "missed", "false_alarm")


def lesion_scores(reference: np.ndarray, prediction: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float]:
    """The scores above of two boolean masks (z, y, x) with their voxel spacing in mm (z, y, x)."""
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    voxel_ml = math.prod(float(s) for s in spacing_zyx) / 1000
    lesion_free = ~reference.reshape(len(reference), -1).any(1)
    fp_per_slice = prediction[lesion_free].reshape(int(lesion_free.sum()), -1).sum(1)
    overlap, ref_voxels, pred_voxels = int((reference & prediction).sum()), int(reference.sum()), int(prediction.sum())
    return {
        "dice": 2 * overlap / (ref_voxels + pred_voxels) if ref_voxels + pred_voxels else float("nan"),
        "hd95_mm": hd95(reference, prediction, spacing_zyx),
        "fp_ml_lesion_free_slices": float(fp_per_slice.sum()) * voxel_ml,
        "lesion_free_slices_with_fp": int((fp_per_slice > 0).sum()),
        "lesion_free_slices": int(lesion_free.sum()),
        "reference_ml": ref_voxels * voxel_ml,
        "predicted_ml": pred_voxels * voxel_ml,
        "missed": int(ref_voxels > 0 and pred_voxels == 0),
        "false_alarm": int(ref_voxels == 0 and pred_voxels > 0),
    }
