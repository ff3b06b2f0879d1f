"""Reading instance-labelled spine CTs in the VerSe layout, and where "up" is in them.

VerSe names a scan `<subject>[_<session>]_ct.nii.gz`, its vertebra mask `..._seg-vert_msk.nii.gz` (one label per
vertebra: 1-7 cervical, 8-19 thoracic, 20-25 lumbar, 28 T13) and its centroids `..._seg-subreg_ctd.json`, in
`rawdata/` and `derivatives/` trees or side by side; any of these layouts is found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_kd.core.settings import KDConfigurationError

CT_SUFFIX, MASK_SUFFIX, CENTROIDS_SUFFIX = "_ct.nii.gz", "_seg-vert_msk.nii.gz", "_seg-subreg_ctd.json"


@dataclass(frozen=True)
class SpineCase:
    name: str
    ct: Path
    mask: Path
    centroids: Path | None = None


def find_cases(folder: str | Path) -> list[SpineCase]:
    """Every CT under `folder` with its vertebra mask (and centroid file, where there is one), sorted by name."""
    folder = Path(folder)
    cts = {p.name[:-len(CT_SUFFIX)]: p for p in folder.rglob(f"*{CT_SUFFIX}")}
    masks = {p.name[:-len(MASK_SUFFIX)]: p for p in folder.rglob(f"*{MASK_SUFFIX}")}
    centroids = {p.name[:-len(CENTROIDS_SUFFIX)]: p for p in folder.rglob(f"*{CENTROIDS_SUFFIX}")}
    if not cts:
        raise KDConfigurationError(f"No CT (*{CT_SUFFIX}) under {folder}. Give the folder of a VerSe-style dataset.")
    unmatched = sorted(set(cts) - set(masks))
    if unmatched:
        raise KDConfigurationError(f"{len(unmatched)} CT(s) under {folder} have no vertebra mask "
                                   f"(*{MASK_SUFFIX}), e.g. {unmatched[:3]}. Add the masks or remove those CTs.")
    return [SpineCase(name, cts[name], masks[name], centroids.get(name)) for name in sorted(cts)]


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(1.0, max(a.GetSpacing())))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def read_case(case: SpineCase) -> tuple[sitk.Image, sitk.Image]:
    """The CT and its vertebra mask, refused when they do not share one voxel grid or the mask is not a label map."""
    ct, mask = sitk.ReadImage(str(case.ct)), sitk.ReadImage(str(case.mask))
    if not same_geometry(ct, mask):
        raise KDConfigurationError(
            f"{case.name}: the vertebra mask's geometry differs from the CT's (size {mask.GetSize()} vs "
            f"{ct.GetSize()}, spacing {mask.GetSpacing()} vs {ct.GetSpacing()}, origin {mask.GetOrigin()} vs "
            f"{ct.GetOrigin()}). Resample the mask onto the CT (nearest neighbour) before converting.")
    labels = np.unique(sitk.GetArrayViewFromImage(mask))
    if labels.min() < 0 or not np.allclose(labels, np.round(labels)):
        raise KDConfigurationError(f"{case.name}: the vertebra mask holds values {labels[:8]}, not integer labels.")
    return ct, mask


# identity direction: array axis 0 (z) runs feet to head, 1 (y) anterior to posterior, 2 (x) right to left
CANONICAL_ORIENTATION = "LPS"


def canonical(image: sitk.Image) -> sitk.Image:
    """`image` with its axes permuted and flipped (no resampling) to one orientation, `CANONICAL_ORIENTATION`.
    nnU-Net ignores the image direction, so the spine's stages see each scan as its array is stored: without this, a
    scan stored feet-first shows stage 2 an upside-down patch, where "the highest vertebra" is the lowest."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def superior_axis(image: sitk.Image) -> tuple[int, int]:
    """(numpy axis of the (z, y, x) array that runs head-feet, +1 if a larger index is more superior else -1).

    ITK's physical space is LPS: superior is +z. The array axis whose direction cosine has the largest z component
    is the head-feet axis.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: image axes x, y, z in physical space
    image_axis = int(np.argmax(np.abs(direction[2])))
    return 2 - image_axis, int(np.sign(direction[2, image_axis]))


def vertebrae_top_down(mask: np.ndarray, axis: int, sign: int) -> list[int]:
    """The labels of `mask` ordered from the most superior centroid down (the numbering may have gaps)."""
    labels = [int(v) for v in np.unique(mask) if v > 0]
    coordinate = {label: float(np.nonzero(mask == label)[axis].mean()) for label in labels}
    return sorted(labels, key=lambda label: -sign * coordinate[label])
