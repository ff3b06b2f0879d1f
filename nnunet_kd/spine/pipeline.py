"""From a CT to numbered vertebrae: stage 1 locates the spine, stage 2 segments one vertebra at a time from the top.

Both stages are ordinary nnU-Net models run with the stock `nnUNetPredictor` (`NnUNetStages`); the search itself is
`segment_vertebrae`, which takes the two stages as functions, so it can be checked with exact stand-ins.

The search sees the CT in one orientation (`canonical`: head up along array axis 0), as the stage-2 patches were cut,
and maps its result back onto the CT's own grid. The spine mask, cleared of stray parts (connected parts much
smaller than the spine's largest), gives a centre line along the head-feet axis. A stage-2 patch is placed with its
top a margin above the highest spine voxel not yet explained; the network sees the CT and the memory (vertebrae found
so far) and outputs the next vertebra. Its largest connected part outside the memory becomes vertebra n (numbered
from the top) if it lies mostly inside the located spine (as Serrador et al. 2024 check), joins the memory, and the
next patch starts below it. Where stage 2 finds nothing, the search looks once more one vertebra height further down
before it stops, so one missed level does not lose the spine below it; the vertebra found after such a gap is marked
unsure (a level may be missing above it). The search also stops when the patch has passed the lower end of the
located spine.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
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
from nnunet_kd.spine.training import without_head_feet
from nnunet_kd.spine.verse import canonical, superior_axis

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
    min_spine_part: float = 0.25  # parts of the located spine smaller than this share of its largest are stray
    min_inside_spine: float = 0.5  # a vertebra lies at least this share inside the located spine
    sure_inside_spine: float = 0.8  # below this share a vertebra is marked unsure


@dataclass
class SpineResult:
    instances: sitk.Image  # 0 background, 1..n vertebrae from the top, on the input CT's grid
    # per vertebra: label, physical (x, y, z) mm and voxel index (x, y, z) of its centroid on the input's grid,
    # volume_ml, inside_spine (share inside the located spine), after_gap, confidence ("high" or "low")
    centroids: list[dict]
    log: list[str] = field(default_factory=list)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected-component labels of `mask` and the voxel count of each label (index 0: background, counted 0)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = _components(mask)
    return labels == int(np.argmax(sizes)) if sizes.max() > 0 else np.zeros_like(mask, dtype=bool)


def spine_without_stray_parts(spine: np.ndarray, min_share: float) -> np.ndarray:
    """The located spine's connected parts of at least `min_share` of its largest: a blob of bone-like voxels above
    the spine would otherwise start the search there (and end it at once), while a spine located in two long parts
    keeps both."""
    labels, sizes = _components(spine)
    if sizes.max() == 0:
        return spine
    return np.isin(labels, np.nonzero(sizes >= min_share * sizes.max())[0])


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

    oriented = canonical(ct)
    spine_native = locate(sitk.GetArrayFromImage(oriented).astype(np.float32), tuple(reversed(oriented.GetSpacing())))
    grid = resample_isotropic(oriented, settings.spacing, False)
    spine_image = sitk.GetImageFromArray(spine_native.astype(np.uint8))
    spine_image.CopyInformation(oriented)
    spine = sitk.GetArrayFromImage(sitk.Resample(spine_image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    image = sitk.GetArrayFromImage(grid).astype(np.float32)
    instances = np.zeros(image.shape, np.uint8)
    levels: list[dict] = []
    if not spine.any():
        say("stage 1 found no spine in this CT: no vertebrae")
        return _result(instances, levels, grid, ct, log)
    kept = spine_without_stray_parts(spine, settings.min_spine_part)
    voxel_ml = settings.spacing ** 3 / 1000
    say(f"stage 1: spine located ({kept.sum() * voxel_ml:.0f} ml)" + (
        f"; {(spine & ~kept).sum() * voxel_ml:.1f} ml of stray parts left out" if (spine & ~kept).any() else ""))
    spine = kept
    axis, sign = superior_axis(grid)
    spine_slices = occupied_slices(spine, axis)
    top, bottom = (spine_slices.max(), spine_slices.min()) if sign > 0 else (spine_slices.min(), spine_slices.max())
    patch = round(settings.patch_mm / settings.spacing)
    margin = round(settings.margin_mm / settings.spacing)
    min_voxels = settings.min_volume_ml / voxel_ml
    start = top  # the highest slice not yet explained by a vertebra
    tops: list[int] = []  # the top slice of each vertebra found: their spacing is one vertebra height
    after_gap = False
    while len(levels) < settings.max_vertebrae:
        along = patch_centre_below(start, axis, sign, [patch] * 3, margin)
        if sign * (along + sign * (patch // 2)) < sign * bottom:  # the whole patch lies below the spine
            say(f"the search passed the lower end of the located spine after {len(levels)} vertebrae")
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
        inside = float((new & _crop(spine, centre, [patch] * 3, False)).sum() / max(new.sum(), 1))
        if new.sum() < min_voxels or inside < settings.min_inside_spine:
            what = ("no further vertebra" if new.sum() < min_voxels
                    else f"a part only {inside:.0%} inside the located spine")
            if after_gap:
                say(f"stage 2 found {what} below vertebra {len(levels)}" +
                    (" (nor one vertebra height further down)" if after_gap else ""))
                break
            height = int(np.median(-sign * np.diff(tops))) if len(tops) > 1 else patch // 4
            say(f"stage 2 found {what} below vertebra {len(levels)}: looking {height * settings.spacing:.0f} mm "
                f"(one vertebra height) further down")
            start -= sign * height
            after_gap = True
            continue
        number = len(levels) + 1
        _paste(instances, new, centre, number)
        extent = occupied_slices(instances == number, axis)
        tops.append(int(extent.max() if sign > 0 else extent.min()))
        # the search only moves down, even if the network returned something above where it looked
        start = min(start - 1, extent.min() - 1) if sign > 0 else max(start + 1, extent.max() + 1)
        levels.append({"label": number, "volume_ml": round(float(new.sum() * voxel_ml), 2),
                       "inside_spine": round(inside, 3), "after_gap": after_gap,
                       "confidence": "low" if after_gap or inside < settings.sure_inside_spine else "high"})
        say(f"vertebra {number}: {new.sum() * voxel_ml:.1f} ml" +
            (" (unsure: found after a level where stage 2 found nothing; one may be missing above it)"
             if after_gap else ""))
        after_gap = False
    return _result(instances, levels, grid, ct, log)


def _result(instances: np.ndarray, levels: list[dict], grid: sitk.Image, ct: sitk.Image,
            log: list[str]) -> SpineResult:
    image = sitk.GetImageFromArray(instances)
    image.CopyInformation(grid)
    # back onto the CT's own grid (and orientation) through physical space
    native = sitk.Resample(image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(native)
    centroids = []
    for level in levels:
        voxels = np.argwhere(array == level["label"])
        if not len(voxels):  # thinner than one voxel of the CT's grid
            continue
        index = voxels.mean(axis=0)[::-1]  # (x, y, z) as ITK indexes
        centroids.append({"label": level["label"], "index_xyz": [round(float(v), 2) for v in index],
                          "physical_xyz_mm": [round(v, 2) for v in
                                              ct.TransformContinuousIndexToPhysicalPoint(index.tolist())],
                          **{k: v for k, v in level.items() if k != "label"}})
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
        # a stage 2 trained with a stock trainer allows test-time mirroring head-feet, which turns "the highest
        # vertebra" into the lowest (nnunet_kd.spine.training)
        stage2 = self.predictors[1]
        stage2.allowed_mirroring_axes = without_head_feet(stage2.allowed_mirroring_axes,
                                                          stage2.plans_manager.transpose_forward)

    def locate(self, ct: np.ndarray, spacing) -> np.ndarray:
        return self.predictors[0].predict_single_npy_array(ct[None], {"spacing": list(spacing)}) > 0

    def segment(self, ct_patch: np.ndarray, memory_patch: np.ndarray, spacing) -> np.ndarray:
        data = np.stack([ct_patch.astype(np.float32), memory_patch.astype(np.float32)])
        return self.predictors[1].predict_single_npy_array(data, {"spacing": list(spacing)}) > 0
