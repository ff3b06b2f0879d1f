"""A generated dataset with many labelled structures, for what grows with the number of classes (stored targets).

TotalSegmentator-like data has over 100 classes; this one has `num_classes` small ellipsoids per volume, one per
class, on a jittered grid in class order. A structure's mean intensity rises with its class index in steps much
smaller than the noise, so neighbouring classes look alike voxel by voxel and a teacher spreads its probability over
a few of them, mostly at the boundaries: the kind of output whose size distillation from stored targets must handle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_kd.data.synthetic import SyntheticSpec, _ellipsoid, _grid, _smooth_noise, write_generated_dataset


def labels_for(num_classes: int) -> dict[str, int]:
    return {"background": 0, **{f"structure_{c:03d}": c for c in range(1, num_classes + 1)}}


def _cells(num_classes: int, shape: tuple[int, int, int]) -> tuple[list[tuple[int, int, int]], list[int]]:
    """A grid cell per class (in class order) and the cells per axis, split in proportion to the volume's extent."""
    per_axis = [1, 1, 1]
    while np.prod(per_axis) < num_classes:
        axis = int(np.argmax([n / c for n, c in zip(shape, per_axis)]))
        per_axis[axis] += 1
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*per_axis)][:num_classes], per_axis


def generate_many_class_case(rng: np.random.Generator, spec: SyntheticSpec,
                             num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (1, z, y, x) float32 and its label map (z, y, x) uint8/uint16 with labels 1..num_classes."""
    shape, spacing = spec.shape, spec.spacing
    coords = _grid(shape, spacing)
    cells, per_axis = _cells(num_classes, shape)
    cell_size = np.array(shape) * np.array(spacing) / np.array(per_axis)
    seg = np.zeros(shape, dtype=np.uint8 if num_classes < 256 else np.uint16)
    image = np.zeros(shape, dtype=np.float32)
    for label, cell in enumerate(cells, start=1):
        centre = (np.array(cell) + rng.uniform(0.35, 0.65, 3)) * cell_size
        radii = cell_size * rng.uniform(0.22, 0.4, 3)
        inside = _ellipsoid(coords, centre, radii) < 1
        seg[inside] = label
        image[inside] = 1.0 + 2.0 * label / num_classes  # neighbouring classes differ by far less than the noise
    bias = 1 + 0.1 * _smooth_noise(rng, shape, 12.0)
    image = image * bias + rng.normal(0, 0.3, shape).astype(np.float32)
    return (100 * image + 300).astype(np.float32)[None], seg


def write_many_class_dataset(raw_folder: str | Path, dataset_id: int = 920, num_classes: int = 50,
                             spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write `Dataset{id}_KDManyClasses{N}` with imagesTr/labelsTr/imagesTs/labelsTs and dataset.json."""
    return write_generated_dataset(
        raw_folder, dataset_id, f"KDManyClasses{num_classes}", spec,
        lambda rng, s: generate_many_class_case(rng, s, num_classes), {"0": "CT"},
        f"nnunet-kd generated dataset with {num_classes} classes, seed {spec.seed}", labels_for(num_classes))
