"""Surface distances between two masks, in mm, with the image spacing (SimpleITK's Maurer distance maps)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Distances (mm) from every surface voxel of `a` to the surface of `b` and back; empty if either mask is."""
    def surface(mask):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
        return image, sitk.GetArrayFromImage(sitk.LabelContour(image)) > 0

    if not a.any() or not b.any():
        return np.zeros(0)
    image_a, surface_a = surface(a)
    image_b, surface_b = surface(b)
    to_b = np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image_b, squaredDistance=False,
                                                                       useImageSpacing=True, insideIsPositive=False)))
    to_a = np.abs(sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image_a, squaredDistance=False,
                                                                       useImageSpacing=True, insideIsPositive=False)))
    return np.concatenate([to_b[surface_a], to_a[surface_b]])


def hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances (mm); NaN where either mask is empty (undefined)."""
    distances = surface_distances(a, b, spacing_zyx)
    return float(np.percentile(distances, 95)) if len(distances) else float("nan")
