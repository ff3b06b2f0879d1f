"""From a CT to numbered vertebrae: stage 1 locates the spine, stage 2 segments one vertebra at a time from the top.

Both stages are ordinary nnU-Net models run with the stock `nnUNetPredictor` (`NnUNetStages`); the search itself is
`segment_vertebrae`, which takes the two stages as functions, so it can be checked with exact stand-ins.

The search: the spine mask gives a centre line along the head-feet axis. A stage-2 patch is placed with its top a
margin above the highest spine voxel not yet explained; the network sees the CT and the memory (vertebrae found so
far) and outputs the next vertebra. Its largest connected part outside the memory becomes vertebra n (numbered from
the top), joins the memory, and the next patch starts below it. The search stops when stage 2 finds nothing new of
at least `min_volume_ml`, or when the patch has passed the lower end of the located spine.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.spine.derive import (
    AIR_HU,
    PATCH_MARGIN_MM,
    _crop,
    occupied_slices,
    patch_centre_below,
    resample_isotropic,
)
from nnunet_kd.spine.verse import superior_axis

STAGE2_KEY = "spine_stage2"  # dataset.json entry with the patch geometry stage 2 was trained on

# (CT array (z, y, x), spacing (z, y, x)) -> spine mask on the same grid
Locate = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]
# (CT patch, memory patch, spacing) -> binary mask of the next vertebra on the patch grid
Segment = Callable[[np.ndarray, np.ndarray, tuple[float, float, float]], np.ndarray]


@dataclass(frozen=True)
class SearchSettings:
    spacing: float = 1.0  # stage 2's isotropic grid (mm)
    patch_mm: float = 96.0  # stage 2's patch edge (mm)
    margin_mm: float = PATCH_MARGIN_MM  # how far above the highest unexplained slice the patch starts
    min_volume_ml: float = 1.0  # smaller new components are noise, not a vertebra
    max_vertebrae: int = 30


@dataclass
class SpineResult:
    instances: sitk.Image  # 0 background, 1..n vertebrae from the top, on the input CT's grid
    centroids: list[dict]  # per vertebra: label, physical (x, y, z) mm, voxel index (x, y, z) of the input
    log: list[str]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    if components.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _paste(target: np.ndarray, patch: np.ndarray, centre, value) -> None:
    lo = [c - s // 2 for c, s in zip(centre, patch.shape)]
    source = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, patch.shape, target.shape))
    inner = tuple(slice(src.start - a, src.stop - a) for src, a in zip(source, lo))
    region = target[source]
    region[patch[inner]] = value


def segment_vertebrae(ct: sitk.Image, locate: Locate, segment: Segment,
                      settings: SearchSettings = SearchSettings(),
                      progress: Callable[[str], None] = lambda message: None) -> SpineResult:
    """Numbered vertebrae of `ct` (see the module docstring); `progress` receives one line per step."""
    log: list[str] = []

    def say(message: str) -> None:
        log.append(message)
        progress(message)

    spine_native = locate(sitk.GetArrayFromImage(ct).astype(np.float32), tuple(reversed(ct.GetSpacing())))
    grid = resample_isotropic(ct, settings.spacing, False)
    spine_image = sitk.GetImageFromArray(spine_native.astype(np.uint8))
    spine_image.CopyInformation(ct)
    spine = sitk.GetArrayFromImage(sitk.Resample(spine_image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    image = sitk.GetArrayFromImage(grid).astype(np.float32)
    instances = np.zeros(image.shape, np.uint8)
    axis, sign = superior_axis(grid)
    if not spine.any():
        say("stage 1 found no spine in this CT: no vertebrae")
        return _result(instances, grid, ct, log)
    say(f"stage 1: spine located ({spine.sum() * settings.spacing ** 3 / 1000:.0f} ml)")
    spine_slices = occupied_slices(spine, axis)
    top, bottom = (spine_slices.max(), spine_slices.min()) if sign > 0 else (spine_slices.min(), spine_slices.max())
    patch = round(settings.patch_mm / settings.spacing)
    margin = round(settings.margin_mm / settings.spacing)
    min_voxels = settings.min_volume_ml * 1000 / settings.spacing ** 3
    start = top  # the highest slice not yet explained by a vertebra
    for number in range(1, settings.max_vertebrae + 1):
        along = patch_centre_below(start, axis, sign, [patch] * 3, margin)
        if sign * (along + sign * (patch // 2)) < sign * bottom:  # the whole patch lies below the spine
            say(f"the search passed the lower end of the located spine after {number - 1} vertebrae")
            break
        centre = [0, 0, 0]
        centre[axis] = int(along)
        in_plane = np.argwhere(np.take(spine, int(np.clip(along, 0, image.shape[axis] - 1)), axis=axis))
        if not len(in_plane):  # between located parts: the nearest slice with spine
            nearest = spine_slices[np.argmin(np.abs(spine_slices - along))]
            in_plane = np.argwhere(np.take(spine, int(nearest), axis=axis))
        for a, value in zip([a for a in range(3) if a != axis], in_plane.mean(axis=0)):
            centre[a] = int(round(value))
        memory = instances > 0
        found = segment(_crop(image, centre, [patch] * 3, AIR_HU),
                        _crop(memory.astype(np.uint8), centre, [patch] * 3, 0),
                        (settings.spacing,) * 3).astype(bool)
        # only voxels of the image that no vertebra holds yet (the patch may reach beyond the image)
        free = _crop(~memory, centre, [patch] * 3, False)
        new = _largest_component(found & free)
        if new.sum() < min_voxels:
            say(f"stage 2 found no further vertebra below vertebra {number - 1}")
            break
        _paste(instances, new, centre, number)
        extent = occupied_slices(instances == number, axis)
        # the search only moves down, even if the network returned something above where it looked
        start = min(start - 1, extent.min() - 1) if sign > 0 else max(start + 1, extent.max() + 1)
        say(f"vertebra {number}: {new.sum() * settings.spacing ** 3 / 1000:.1f} ml")
    return _result(instances, grid, ct, log)


def _result(instances: np.ndarray, grid: sitk.Image, ct: sitk.Image, log: list[str]) -> SpineResult:
    image = sitk.GetImageFromArray(instances)
    image.CopyInformation(grid)
    native = sitk.Resample(image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(native)
    centroids = []
    for label in (int(v) for v in np.unique(array) if v):
        index = np.argwhere(array == label).mean(axis=0)[::-1]  # (x, y, z) as ITK indexes
        centroids.append({"label": label, "index_xyz": [round(float(v), 2) for v in index],
                          "physical_xyz_mm": [round(v, 2) for v in
                                              ct.TransformContinuousIndexToPhysicalPoint(index.tolist())]})
    return SpineResult(native, centroids, log)


class NnUNetStages:
    """Stage 1 and stage 2 as trained nnU-Net model folders, run with the stock `nnUNetPredictor`."""

    def __init__(self, stage1: str | Path, stage2: str | Path, folds1=(0,), folds2=(0,), device: str = "cpu",
                 checkpoint: str = "checkpoint_final.pth", mirroring: bool = True) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        stage2_json = json.loads((Path(stage2) / "dataset.json").read_text())
        channels = stage2_json.get("channel_names", {})
        if len(channels) != 2 or STAGE2_KEY not in stage2_json:
            raise KDConfigurationError(
                f"{stage2} is not a stage-2 spine model: its dataset.json has channels {channels} and no "
                f"'{STAGE2_KEY}' entry. Train stage 2 on the dataset `nnunet_kd spine convert` writes (CT + "
                f"memory channel).")
        geometry = stage2_json[STAGE2_KEY]
        # the margin the patches were cut with (models converted before it was recorded used the default)
        self.settings = SearchSettings(spacing=float(geometry["spacing"]), patch_mm=float(geometry["patch_mm"]),
                                       margin_mm=float(geometry.get("margin_mm", PATCH_MARGIN_MM)))
        self.predictors = []
        for folder, folds in ((stage1, folds1), (stage2, folds2)):
            predictor = nnUNetPredictor(use_mirroring=mirroring, device=torch.device(device),
                                        perform_everything_on_device=device == "cuda", allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), tuple(folds), checkpoint)
            self.predictors.append(predictor)

    def locate(self, ct: np.ndarray, spacing) -> np.ndarray:
        return self.predictors[0].predict_single_npy_array(ct[None], {"spacing": list(spacing)}) > 0

    def segment(self, ct_patch: np.ndarray, memory_patch: np.ndarray, spacing) -> np.ndarray:
        data = np.stack([ct_patch.astype(np.float32), memory_patch.astype(np.float32)])
        return self.predictors[1].predict_single_npy_array(data, {"spacing": list(spacing)}) > 0
