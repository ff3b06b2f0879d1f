"""Generated spine CTs with one label per vertebra, in the VerSe layout, for tests and the demo (no downloads).

Each volume holds a curved column of vertebra-like bones (a body, and a posterior arch with a spinous process)
separated by discs, numbered as in VerSe (1-7 cervical, 8-19 thoracic, 20-25 lumbar) from the head down. What makes
the task need context: neighbouring vertebrae look alike, thoracic levels carry rib-like bones that touch them, the
field of view starts and ends at random (cut vertebrae at the borders), and the column count and curvature vary.
Intensities are CT-like (HU) with noise. The superior direction is +z of the array (index 0 is the most inferior
slice), as in a LPS/RAS CT with identity direction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FIRST_THORACIC, FIRST_LUMBAR, LAST_LABEL = 8, 20, 24


@dataclass(frozen=True)
class SpineSpec:
    shape: tuple[int, int, int] = (112, 48, 48)  # (z, y, x) voxels
    spacing: float = 2.0  # mm, isotropic
    vertebrae: tuple[int, int] = (5, 8)  # how many whole vertebrae the column has (before the field of view cuts it)
    seed: int = 0


def _column(rng: np.random.Generator, spec: SpineSpec) -> tuple[int, list[float], list[float]]:
    """First label, and the z centre and height (mm) of each vertebra from the top (superior) down."""
    count = int(rng.integers(spec.vertebrae[0], spec.vertebrae[1] + 1))
    first = int(rng.integers(FIRST_THORACIC, LAST_LABEL - count + 2))
    extent = spec.shape[0] * spec.spacing
    heights = [float(rng.uniform(16, 22)) + 4 * (first + i >= FIRST_LUMBAR) for i in range(count)]
    discs = [float(rng.uniform(4, 7)) for _ in range(count)]
    length = sum(heights) + sum(discs)
    # the column may reach beyond the field of view at either end: the border vertebrae are then cut
    top = extent - float(rng.uniform(-0.1, 0.15)) * extent + max(0.0, length - extent) * float(rng.uniform(0, 0.5))
    centres, z = [], top
    for height, disc in zip(heights, discs):
        centres.append(z - height / 2)
        z -= height + disc
    return first, centres, heights


def generate_spine_case(rng: np.random.Generator, spec: SpineSpec) -> tuple[np.ndarray, np.ndarray, dict[int, list]]:
    """CT (float32 HU), instance mask (uint8, VerSe labels) and centroids {label: [z, y, x] voxel}, arrays (z, y, x)."""
    shape, spacing = spec.shape, spec.spacing
    z, y, x = (np.arange(n, dtype=np.float32).reshape([n if j == i else 1 for j in range(3)]) * spacing
               for i, n in enumerate(shape))
    extent_y, extent_x = shape[1] * spacing, shape[2] * spacing
    # the column's centre line bends smoothly in y (lordosis/kyphosis) and x (scoliosis)
    phase, amp_y, amp_x = rng.uniform(0, 2 * np.pi, 2), rng.uniform(3, 10), rng.uniform(0, 6)
    period = shape[0] * spacing * rng.uniform(1.2, 2.0)

    def centre_line(zz):
        return (extent_y * 0.45 + amp_y * np.sin(2 * np.pi * zz / period + phase[0]),
                extent_x * 0.5 + amp_x * np.sin(2 * np.pi * zz / period + phase[1]))

    cy, cx = centre_line(z)
    ct = np.full(shape, -1000.0, np.float32)
    body = ((y - extent_y * 0.5) / (extent_y * 0.48)) ** 2 + ((x - extent_x * 0.5) / (extent_x * 0.48)) ** 2 < 1
    ct[np.broadcast_to(body, shape)] = 40.0  # soft tissue inside the body outline
    mask = np.zeros(shape, np.uint8)
    first, centres, heights = _column(rng, spec)
    centroids = {}
    for index, (zc, height) in enumerate(zip(centres, heights)):
        label = first + index
        radius = rng.uniform(11, 14) + 2 * (label >= FIRST_LUMBAR)
        dz = (z - zc) / (height / 2)
        vertebral_body = ((y - cy) / radius) ** 2 + ((x - cx) / radius) ** 2 + dz ** 4 < 1
        # posterior arch and spinous process, behind the body (+y)
        arch = (((y - cy - radius * 1.35) / (radius * 0.45)) ** 2 + ((x - cx) / (radius * 0.9)) ** 2 + dz ** 4 < 1) \
            & ~(((y - cy - radius * 1.3) / (radius * 0.3)) ** 2 + ((x - cx) / (radius * 0.35)) ** 2 < 1)
        spinous = (((y - cy - radius * 2.0) / (radius * 0.6)) ** 2 + ((x - cx) / 3.0) ** 2
                   + ((z - zc + height * 0.15) / (height * 0.35)) ** 2 < 1)
        bone = vertebral_body | arch | spinous
        mask[bone] = label
        ct[bone] = rng.uniform(250, 450)
        ct[vertebral_body & (((y - cy) / (radius - 2)) ** 2 + ((x - cx) / (radius - 2)) ** 2 + dz ** 4 < 0.7)] = \
            rng.uniform(150, 250)  # cancellous core, cortical shell
        if label < FIRST_LUMBAR:  # ribs: bone that touches the vertebra but is not part of it
            ry, rx = (float(c) for c in centre_line(zc))
            for side in (-1, 1):
                for s in np.linspace(0, 1, 12):
                    py, px, pz = ry + radius * (1.1 + 0.6 * s) - 12 * s ** 2, rx + side * radius * (1.2 + 2.4 * s), \
                        zc - 6 * s
                    rib = (y - py) ** 2 + (x - px) ** 2 + (z - pz) ** 2 < 3.5 ** 2
                    ct[rib & (mask == 0)] = 350.0
        inside = np.argwhere(mask == label)
        if len(inside):
            centroids[label] = inside.mean(axis=0).round(1).tolist()
    # discs between neighbours: brighter than soft tissue, darker than bone
    disc = (((y - cy) / 12.0) ** 2 + ((x - cx) / 12.0) ** 2 < 1) & (mask == 0) & (ct < 100)
    below_top = z < centres[0]
    above_bottom = z > centres[-1]
    ct[disc & below_top & above_bottom] = 90.0
    ct += rng.normal(0, 25, shape).astype(np.float32)
    labels_present = np.unique(mask)
    centroids = {k: v for k, v in centroids.items() if k in labels_present}
    return ct, mask, centroids


def write_verse_case(folder: Path, name: str, ct: np.ndarray, mask: np.ndarray, centroids: dict[int, list],
                     spacing: float) -> None:
    """`<name>_ct.nii.gz`, `<name>_seg-vert_msk.nii.gz` and `<name>_seg-subreg_ctd.json` as VerSe names them."""
    folder.mkdir(parents=True, exist_ok=True)
    for array, suffix in ((ct.astype(np.int16), "ct"), (mask, "seg-vert_msk")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((spacing,) * 3)
        sitk.WriteImage(image, str(folder / f"{name}_{suffix}.nii.gz"))
    # VerSe's centroid files list the orientation first, then one entry per vertebra, in voxel coordinates (x, y, z)
    entries = [{"direction": ["L", "P", "S"]}] + [{"label": label, "X": c[2], "Y": c[1], "Z": c[0]}
                                                   for label, c in sorted(centroids.items())]
    (folder / f"{name}_seg-subreg_ctd.json").write_text(json.dumps(entries, indent=1))


def write_spine_dataset(folder: Path, num_cases: int, spec: SpineSpec = SpineSpec()) -> list[str]:
    """`num_cases` generated spines in the VerSe layout under `folder`; returns the case names."""
    rng = np.random.default_rng(spec.seed)
    names = []
    for index in range(num_cases):
        name = f"sub-synth{index:03d}"
        ct, mask, centroids = generate_spine_case(rng, spec)
        write_verse_case(folder, name, ct, mask, centroids, spec.spacing)
        names.append(name)
    return names
