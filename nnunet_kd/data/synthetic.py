"""A small, deterministic, generated 3D segmentation dataset in nnU-Net's raw format.

It exists so the demo and the tests run anywhere without downloads. Each volume holds three labelled structures
that differ in shape, size and contrast, on a noisy background with a smooth bias field and unlabelled distractors
that look like the small structures. Telling them apart needs context, so a tiny network is measurably worse than a
large one, which is what makes the dataset useful for distillation.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}
CHANNEL_NAMES = {"0": "MR"}


@dataclass(frozen=True)
class SyntheticSpec:
    shape: tuple[int, int, int] = (40, 56, 56)
    spacing: tuple[float, float, float] = (1.5, 1.0, 1.0)  # (z, y, x) mm: mildly anisotropic like many MR scans
    num_training: int = 24
    num_test: int = 6
    seed: int = 0


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    # broadcastable (n,1,1), (1,n,1), (1,1,n) physical coordinates in mm
    return tuple((np.arange(n, dtype=np.float32) * s).reshape([n if j == i else 1 for j in range(3)])
                 for i, (n, s) in enumerate(zip(shape, spacing)))


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    field = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(field, sigma))
    return field / (field.std() + 1e-8)


def generate_case(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32) and its label map (uint8), both (z, y, x)."""
    shape, spacing = spec.shape, spec.spacing
    coords = _grid(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    seg = np.zeros(shape, dtype=np.uint8)

    # organ: a large ellipsoid with a wobbly boundary
    centre = extent * rng.uniform(0.4, 0.6, 3)
    radii = extent * rng.uniform(0.22, 0.32, 3)
    wobble = 0.15 * _smooth_noise(rng, shape, 6.0)
    organ = _ellipsoid(coords, centre, radii) + wobble < 1
    seg[organ] = LABELS["organ"]

    # vessel: a thin curved tube crossing the volume, partly through the organ
    t = np.linspace(0, 1, 200)
    start, end = extent * rng.uniform(0.1, 0.3, 3), extent * rng.uniform(0.7, 0.9, 3)
    bend = extent * rng.uniform(-0.2, 0.2, 3)
    path = start[:, None] * (1 - t) + end[:, None] * t + bend[:, None] * np.sin(np.pi * t)
    radius = rng.uniform(1.8, 2.8)
    vessel = np.zeros(shape, dtype=bool)
    for p in path.T:
        lo = np.maximum(((p - radius - 1) / spacing).astype(int), 0)
        hi = np.minimum(((p + radius + 1) / spacing).astype(int) + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        sub = [c[tuple(slice(a, b) if i == j else slice(None) for j, (a, b) in enumerate(zip(lo, hi)))]
               for i, c in enumerate(coords)]
        vessel[sl] |= sum((c - q) ** 2 for c, q in zip(sub, p)) < radius ** 2
    seg[vessel] = LABELS["vessel"]

    # lesions: 1-3 small spheres inside the organ
    organ_voxels = np.argwhere(seg == LABELS["organ"])
    for _ in range(rng.integers(1, 4)):
        if len(organ_voxels) == 0:
            break
        c = organ_voxels[rng.integers(len(organ_voxels))] * np.array(spacing)
        r = rng.uniform(3.5, 6.5)
        seg[(_ellipsoid(coords, c, (r, r, r)) < 1) & (seg == LABELS["organ"])] = LABELS["lesion"]

    # intensities: the lesion differs from the organ by about the noise level, and bright distractors outside the
    # organ look like lesions, so telling them apart needs spatial context
    means = {0: 0.0, 1: rng.uniform(1.0, 1.3), 2: rng.uniform(1.8, 2.1), 3: rng.uniform(2.4, 2.8)}
    image = np.zeros(shape, dtype=np.float32)
    for label, mean in means.items():
        image[seg == label] = mean
    image += 0.3 * _smooth_noise(rng, shape, 2.0) * (seg == LABELS["organ"])  # organ texture
    # distractors: lesion-bright blobs outside the organ, unlabelled
    for _ in range(rng.integers(2, 5)):
        c = extent * rng.uniform(0.05, 0.95, 3)
        r = rng.uniform(2.5, 5.0)
        blob = (_ellipsoid(coords, c, (r, r, r)) < 1) & (seg == 0)
        image[blob] = means[2]
    bias = 1 + 0.2 * _smooth_noise(rng, shape, 12.0)
    image = image * bias + rng.normal(0, 0.4, shape).astype(np.float32)
    return (100 * image + 300).astype(np.float32), seg


def _write(array: np.ndarray, spacing, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK spacing is (x, y, z)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_dataset(raw_folder: str | Path, dataset_id: int = 900, name: str = "KDSynthetic",
                  spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write `Dataset{id}_{name}` with imagesTr/labelsTr/imagesTs/labelsTs and dataset.json; return its folder."""
    def one_channel(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
        image, seg = generate_case(rng, spec)
        return image[None], seg

    return write_generated_dataset(raw_folder, dataset_id, name, spec, one_channel, CHANNEL_NAMES,
                                   f"nnunet-kd generated dataset, seed {spec.seed}")


def write_generated_dataset(raw_folder: str | Path, dataset_id: int, name: str, spec: SyntheticSpec,
                            generate: Callable[[np.random.Generator, SyntheticSpec], tuple[np.ndarray, np.ndarray]],
                            channel_names: dict[str, str], description: str,
                            labels: dict[str, int] = LABELS) -> Path:
    """Write `Dataset{id}_{name}` in nnU-Net's raw format from `generate(rng, spec) -> (images (C, z, y, x), seg)`."""
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    for i in range(spec.num_training + spec.num_test):
        images, seg = generate(rng, spec)
        split = "Tr" if i < spec.num_training else "Ts"
        case = f"case_{i:03d}"
        for channel, image in enumerate(images):
            _write(image, spec.spacing, folder / f"images{split}" / f"{case}_{channel:04d}.nii.gz")
        _write(seg, spec.spacing, folder / f"labels{split}" / f"{case}.nii.gz")
    dataset_json = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": spec.num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": description,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
