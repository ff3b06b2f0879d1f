"""The two nnU-Net datasets of the spine pipeline, derived from instance-labelled CTs.

Stage 1 (spine location): the whole CT at a coarse isotropic spacing, labelled spine / background.
Stage 2 (one vertebra at a time, after Lessmann et al. 2019 as used by Serrador et al. 2024): patches of a fixed
physical size around each vertebra with two channels, the CT and a *memory* of the vertebrae above it, labelled with
one vertebra: the highest one in the patch that is not in memory and lies (almost) wholly inside it. Extra patches
teach the rest of the scheme: the memory emptied (so the first vertebra is found), and a patch below the last
vertebra with everything in memory (nothing left: the search stops). Each patch is placed the way the search places
it (nnunet_kd.spine.pipeline): its top `PATCH_MARGIN_MM` above the highest slice not yet explained, here the top of
the vertebra to find, with a random shift of up to the jitter along every axis. Centred patches would teach the
network "the vertebra in the middle", which is the one *below* the next one in the search's patches. The folds keep
all patches of one scan together (`grouped_splits`). Both stages see every scan in one orientation (`canonical`:
head up along array axis 0), as the search shows it to them; stage 2 must then not be mirrored head-feet
(`nnunet_kd.spine.training.HeadFeetUnmirrored`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_kd.spine.verse import SpineCase, canonical, read_case, superior_axis, vertebrae_top_down

AIR_HU = -1024
# a vertebra counts as inside a patch when this share of its voxels is
WHOLLY_INSIDE = 0.9
# the search puts a stage-2 patch's top this far above the highest slice of the spine not yet explained
PATCH_MARGIN_MM = 8.0


def resample_isotropic(image: sitk.Image, spacing: float, label: bool) -> sitk.Image:
    """`image` on an isotropic grid of `spacing` mm over the same extent, direction and origin."""
    size = [max(1, round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                         image.GetOrigin(), (spacing,) * 3, image.GetDirection(), 0 if label else AIR_HU,
                         image.GetPixelID())


def _write(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    image.SetOrigin(reference.GetOrigin())
    sitk.WriteImage(image, str(path))


def _dataset_json(folder: Path, channels: dict, labels: dict, num_training: int, description: str,
                  **extra) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(folder), channels, labels, num_training, ".nii.gz", dataset_name=folder.name,
                          description=description, **extra)


def write_stage1_dataset(cases: Sequence[SpineCase], folder: Path, spacing: float = 4.0) -> list[str]:
    """nnU-Net raw dataset `folder` (e.g. $nnUNet_raw/Dataset501_SpineLocation): CT -> spine mask at `spacing` mm."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    for case in cases:
        ct, mask = (canonical(image) for image in read_case(case))  # as the search shows it (pipeline.py)
        ct, mask = resample_isotropic(ct, spacing, False), resample_isotropic(mask, spacing, True)
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        _write((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8), mask,
               folder / "labelsTr" / f"{case.name}.nii.gz")
    _dataset_json(folder, {"0": "CT"}, {"background": 0, "spine": 1}, len(cases),
                  f"Spine location (stage 1 of the vertebra pipeline) at {spacing} mm, from instance masks")
    return [case.name for case in cases]


def _crop(array: np.ndarray, centre: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    out = np.full(size, fill, dtype=array.dtype)
    lo = [c - s // 2 for c, s in zip(centre, size)]
    source = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, array.shape))
    if any(part.stop <= part.start for part in source):  # wholly outside the image (e.g. below a cut last vertebra)
        return out
    target = tuple(slice(src.start - a, src.stop - a) for src, a in zip(source, lo))
    out[target] = array[source]
    return out


def target_vertebra(mask_patch: np.ndarray, memory_patch: np.ndarray, order: Sequence[int],
                    voxels: dict[int, int]) -> int | None:
    """The label stage 2 must output for this patch: the highest vertebra (in `order`, top down) that is not in
    memory and lies wholly inside the patch; None if there is none."""
    in_memory = set(np.unique(mask_patch[memory_patch > 0]).tolist())
    for label in order:
        if label not in in_memory and (mask_patch == label).sum() >= WHOLLY_INSIDE * voxels[label]:
            return label
    return None


def occupied_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Indices along `axis` of the slices where `mask` has a voxel."""
    return np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]


def patch_centre_below(start: float, axis: int, sign: int, patch: Sequence[int], margin: int) -> float:
    """Where along `axis` the search centres a patch whose top lies `margin` voxels above slice `start`."""
    return start - sign * (patch[axis] // 2 - margin)


def stage2_patches(ct: np.ndarray, mask: np.ndarray, axis: int, sign: int, patch: Sequence[int],
                   rng: np.random.Generator, jitter: int, empty_memory: float, margin: int = 4):
    """(suffix, CT patch, memory patch, label patch) for every training patch of one scan (arrays (z, y, x)); patches
    sit as the search puts them, `margin` voxels above the vertebra's top, shifted by up to `jitter` voxels."""
    order = vertebrae_top_down(mask, axis, sign)
    voxels = {label: int((mask == label).sum()) for label in order}
    centroids = {label: np.argwhere(mask == label).mean(axis=0) for label in order}
    slices = {label: occupied_slices(mask == label, axis) for label in order}
    top = {label: (s.max() if sign > 0 else s.min()) for label, s in slices.items()}

    def placed(start: float, in_plane: np.ndarray) -> np.ndarray:
        centre = in_plane.astype(float).copy()
        centre[axis] = patch_centre_below(start, axis, sign, patch, margin)
        return np.round(centre + rng.integers(-jitter, jitter + 1, 3)).astype(int)

    for index, label in enumerate(order):
        centre = placed(top[label], centroids[label])
        above = np.isin(mask, order[:index])
        variants = [("", above)]
        if index > 0 and rng.random() < empty_memory:
            variants.append(("_nomem", np.zeros_like(above)))
        for suffix, memory in variants:
            yield (f"_v{label:02d}{suffix}", *_patch_arrays(ct, mask, memory, centre, patch, order, voxels))
    # below the last vertebra, everything in memory: there is nothing left to find
    last = slices[order[-1]]
    below_last = (last.min() - 1) if sign > 0 else (last.max() + 1)
    yield ("_end", *_patch_arrays(ct, mask, mask > 0, placed(below_last, centroids[order[-1]]), patch, order,
                                  voxels))


def _patch_arrays(ct, mask, memory, centre, patch, order, voxels):
    ct_patch = _crop(ct, centre, patch, AIR_HU)
    mask_patch = _crop(mask, centre, patch, 0)
    memory_patch = _crop(memory.astype(np.uint8), centre, patch, 0)
    target = target_vertebra(mask_patch, memory_patch, order, voxels)
    label_patch = (mask_patch == target).astype(np.uint8) if target is not None else np.zeros(patch, np.uint8)
    return ct_patch, memory_patch, label_patch


def write_stage2_dataset(cases: Sequence[SpineCase], folder: Path, spacing: float = 1.0,
                         patch_mm: float = 96.0, jitter_mm: float = 8.0, empty_memory: float = 0.25,
                         seed: int = 0) -> dict[str, list[str]]:
    """nnU-Net raw dataset `folder`: (CT, memory) -> one vertebra, patches of `patch_mm` at `spacing` mm.

    Returns the patch ids of each scan (for `grouped_splits`).
    """
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    patch = [round(patch_mm / spacing)] * 3
    groups: dict[str, list[str]] = {}
    for case in cases:
        ct_image, mask_image = (canonical(image) for image in read_case(case))
        ct_image = resample_isotropic(ct_image, spacing, False)
        mask_image = resample_isotropic(mask_image, spacing, True)
        axis, sign = superior_axis(ct_image)
        ct, mask = sitk.GetArrayFromImage(ct_image), sitk.GetArrayFromImage(mask_image)
        reference = sitk.Image(list(reversed(patch)), sitk.sitkUInt8)
        reference.SetSpacing((spacing,) * 3)
        reference.SetDirection(ct_image.GetDirection())
        for suffix, ct_patch, memory, label in stage2_patches(ct, mask, axis, sign, patch, rng,
                                                              round(jitter_mm / spacing), empty_memory,
                                                              round(PATCH_MARGIN_MM / spacing)):
            name = case.name + suffix
            _write(ct_patch.astype(np.int16), reference, folder / "imagesTr" / f"{name}_0000.nii.gz")
            _write(memory, reference, folder / "imagesTr" / f"{name}_0001.nii.gz")
            _write(label, reference, folder / "labelsTr" / f"{name}.nii.gz")
            groups.setdefault(case.name, []).append(name)
    # nnU-Net copies dataset.json into the model folder: the search reads the patch geometry from there
    _dataset_json(folder, {"0": "CT", "1": "noNorm"}, {"background": 0, "vertebra": 1},
                  sum(len(v) for v in groups.values()),
                  f"Vertebra by vertebra (stage 2): CT + memory of the vertebrae above -> the next vertebra; "
                  f"{patch_mm} mm patches at {spacing} mm",
                  spine_stage2={"spacing": spacing, "patch_mm": patch_mm, "margin_mm": PATCH_MARGIN_MM})
    return groups


def write_one_shot_dataset(cases: Sequence[SpineCase], folder: Path, spacing: float = 1.0) -> dict[int, int]:
    """The baseline: one multi-label nnU-Net on whole CTs at `spacing` mm, one class per vertebra label present
    (nnU-Net wants consecutive classes; dataset.json's `verse_labels` maps them back). Returns class -> label.
    The scans keep their stored orientation, as stock nnUNetv2_predict sees them."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    resampled = []
    for case in cases:
        ct, mask = read_case(case)
        resampled.append((case, resample_isotropic(ct, spacing, False), resample_isotropic(mask, spacing, True)))
    present = sorted({int(v) for _, _, mask in resampled for v in np.unique(sitk.GetArrayViewFromImage(mask)) if v})
    to_class = {label: index for index, label in enumerate(present, 1)}
    lookup = np.zeros(max(present) + 1, np.uint8)
    for label, index in to_class.items():
        lookup[label] = index
    for case, ct, mask in resampled:
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        _write(lookup[sitk.GetArrayViewFromImage(mask)], mask, folder / "labelsTr" / f"{case.name}.nii.gz")
    _dataset_json(folder, {"0": "CT"}, {"background": 0, **{f"vertebra_{label}": index
                                                             for label, index in to_class.items()}},
                  len(cases), f"One-shot multi-label vertebrae (the baseline) at {spacing} mm",
                  verse_labels={str(index): label for label, index in to_class.items()})
    return {index: label for label, index in to_class.items()}


def grouped_splits(groups: dict[str, list[str]], folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json content with every patch of a scan in the same fold."""
    scans = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(scans)
    splits = []
    for fold in range(folds):
        val_scans = set(scans[fold::folds])
        splits.append({"train": sorted(i for s in scans if s not in val_scans for i in groups[s]),
                       "val": sorted(i for s in val_scans for i in groups[s])})
    return splits


def write_grouped_splits(preprocessed_dataset_folder: Path, groups: dict[str, list[str]], folds: int = 5) -> Path:
    preprocessed_dataset_folder.mkdir(parents=True, exist_ok=True)
    path = preprocessed_dataset_folder / "splits_final.json"
    path.write_text(json.dumps(grouped_splits(groups, folds), indent=1))
    return path
