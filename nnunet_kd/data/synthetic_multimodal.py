"""A generated 4-modality dataset (channels T1, T2, FLAIR, T1CE, as in BraTS) for fewer-modality distillation.

Each case has the geometry of nnunet_kd.data.synthetic (organ, 1-3 lesions, a vessel). FLAIR is exactly that module's
image, distractors included: lesions differ from the organ by about the noise level, and unlabelled lesion-bright
blobs lie outside the organ. T2 shows lesions brightly and has no distractors, so a model with T2 finds lesions
easily; T1CE shows the vessel, T1 the organ but darkens lesions. A student on FLAIR + T1CE lacks the channels that
give lesions away, which is the gap the teacher's knowledge can close.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_kd.data.synthetic import LABELS, SyntheticSpec, _smooth_noise, generate_case, write_generated_dataset

CHANNEL_NAMES = {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T1CE"}
STUDENT_CHANNELS = "FLAIR,T1CE"
# mean intensity of background, organ, lesion and vessel before bias field and noise, and the (scale, offset) that
# gives each modality its own intensity range; FLAIR comes from nnunet_kd.data.synthetic
CONTRASTS = {
    "T1": ((0.0, 1.2, 0.6, 0.2), (80.0, 500.0)),
    "T2": ((0.0, 1.0, 3.0, 0.6), (120.0, 200.0)),
    "T1CE": ((0.0, 1.2, 1.2, 3.0), (90.0, 400.0)),
}


def _modality(rng: np.random.Generator, seg: np.ndarray, means, scale_offset) -> np.ndarray:
    shape = seg.shape
    image = np.zeros(shape, dtype=np.float32)
    for label, mean in zip(LABELS.values(), means):
        image[seg == label] = mean
    image += 0.2 * _smooth_noise(rng, shape, 2.0) * (seg == LABELS["organ"])
    image = image * (1 + 0.2 * _smooth_noise(rng, shape, 12.0)) + rng.normal(0, 0.4, shape).astype(np.float32)
    scale, offset = scale_offset
    return (scale * image + offset).astype(np.float32)


def generate_multimodal_case(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images (4, z, y, x) float32 in CHANNEL_NAMES order, and the label map (z, y, x) uint8."""
    flair, seg = generate_case(rng, spec)
    images = {name: _modality(rng, seg, *CONTRASTS[name]) for name in ("T1", "T2", "T1CE")}
    images["FLAIR"] = flair
    return np.stack([images[CHANNEL_NAMES[str(i)]] for i in range(len(CHANNEL_NAMES))]), seg


def write_multimodal_dataset(raw_folder: str | Path, dataset_id: int = 910, name: str = "KDSyntheticMultiModal",
                             spec: SyntheticSpec = SyntheticSpec(), zero_border: int = 0) -> Path:
    """Write `Dataset{id}_{name}` (imagesTr/labelsTr/imagesTs/labelsTs, 4 channels) and dataset.json.

    `zero_border`: voxels of zeros around every case in every channel, like skull-stripped MR in a larger field of
    view. Where that makes the non-zero box much smaller than the image, nnU-Net crops to it and normalises inside
    the mask (its plans' `use_mask_for_norm`), and its augmentation sets the outside back to zero.
    """
    def generate(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
        images, seg = generate_multimodal_case(rng, spec)
        if zero_border:
            images = np.pad(images, [(0, 0)] + [(zero_border, zero_border)] * 3)
            seg = np.pad(seg, zero_border)
        return images, seg

    return write_generated_dataset(raw_folder, dataset_id, name, spec, generate, CHANNEL_NAMES,
                                   f"nnunet-kd generated 4-modality dataset, seed {spec.seed}; a student on "
                                   f"{STUDENT_CHANNELS} lacks T2, which shows the lesions")
