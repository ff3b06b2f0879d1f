"""Stored teacher targets in training: through nnU-Net's own data loader and augmentation, in lock step with the image.

`TargetsDataset` hands the loader the image channels, the target channels and a validity channel as one lazily
cropped array, so the patch crop is shared;
`with_stored_targets` moves the targets into nnU-Net's `regression_target` before augmentation, so the spatial
transforms (rotation, scaling, mirroring) resample them in lock step with the image (linearly) and the intensity
transforms leave them alone, and appends them to the image channels at the end; `teacher_outputs_from_targets`
splits them off in the train step and brings them to each deep-supervision scale. The validity channel (1 inside the
image, 0 where the loader or the spatial transform padded) normalises the interpolation at the border; where less
than half a voxel is valid the teacher never saw the image, and the student's own (detached) output takes the
teacher's place, so voxel-wise KD terms have no gradient there.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_kd.errors import KDConfigurationError
from nnunet_kd.losses.deep_supervision import resample_logits
from nnunet_kd.teacher_targets import CASE_SUFFIX

# below this share of valid voxels (after interpolation) a target voxel lies in padding the teacher never saw
MIN_VALID = 0.5


class _ChannelStack:
    """Image channels, target channels and a validity channel of ones, as one array nnU-Net's loader crops.

    Only the cropped region is read (blosc2 decompresses the chunks it touches), like the loader's own crop.
    """

    def __init__(self, image, targets) -> None:
        self.image, self.targets = image, targets
        self.shape = (image.shape[0] + targets.shape[0] + 1, *image.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        spatial = (slice(None), *index[1:])
        image = np.asarray(self.image[spatial], dtype=np.float32)
        targets = np.asarray(self.targets[spatial], dtype=np.float32)
        return np.concatenate([image, targets, np.ones((1, *image.shape[1:]), np.float32)])[index[0]]


class TargetsDataset:
    """An nnU-Net dataset whose cases carry the stored teacher targets as extra channels (see `_ChannelStack`)."""

    def __init__(self, dataset, folder: str | Path) -> None:
        self.dataset, self.folder = dataset, str(folder)
        self.identifiers = dataset.identifiers

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        import blosc2

        data, seg, seg_previous, properties = self.dataset.load_case(identifier)
        targets = blosc2.open(urlpath=os.path.join(self.folder, identifier + CASE_SUFFIX), mode="r",
                              dparams={"nthreads": 1}, mmap_mode="r")
        if tuple(targets.shape[1:]) != tuple(data.shape[1:]):
            raise KDConfigurationError(f"Stored teacher targets of {identifier} have shape {targets.shape[1:]}, its "
                                       f"preprocessed image {data.shape[1:]}: the targets are from other "
                                       f"preprocessing. Write them again (`nnunet_kd teacher-targets --force`).")
        return _ChannelStack(data, targets), seg, seg_previous, properties


class _SplitTargets(BasicTransform):
    """Channels after the image's become nnU-Net's regression target: spatial transforms only, linear resampling."""

    def __init__(self, num_image_channels: int) -> None:
        super().__init__()
        self.num_image_channels = num_image_channels

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        data_dict["image"] = image[:self.num_image_channels]
        data_dict["regression_target"] = image[self.num_image_channels:]
        return data_dict


class _AppendTargets(BasicTransform):
    """The augmented targets back behind the image channels: nnU-Net's loader batches 'image' and 'segmentation'."""

    def apply(self, data_dict: dict, **params) -> dict:
        data_dict["image"] = torch.cat([data_dict["image"], data_dict.pop("regression_target")])
        return data_dict


def with_stored_targets(transforms: ComposeTransforms, num_image_channels: int) -> ComposeTransforms:
    """nnU-Net's training transforms, with the stored targets carried through them in lock step with the image."""
    return ComposeTransforms([_SplitTargets(num_image_channels), *transforms.transforms, _AppendTargets()])


def split_batch(data: torch.Tensor, num_image_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of (image, targets, validity) channels -> the image, and the targets with their validity."""
    return data[:, :num_image_channels], data[:, num_image_channels:]


def teacher_outputs_from_targets(targets: torch.Tensor,
                                 student_outputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's output at the resolution of each student output, from augmented stored targets.

    `targets` holds the target channels and, last, the validity channel. Both are area-averaged to each output's
    shape and divided (an interpolation normalised over valid voxels); voxels less than half valid take the student's
    own detached output, so a voxel-wise KD term neither pulls nor pushes there.
    """
    if isinstance(student_outputs, torch.Tensor):
        student_outputs = [student_outputs]
    values, validity = targets[:, :-1].float(), targets[:, -1:].float()
    teacher = []
    for student in student_outputs:
        shape = student.shape[2:]
        share = resample_logits(validity, shape)
        normalised = resample_logits(values, shape) / share.clamp_min(MIN_VALID)
        teacher.append(torch.where(share >= MIN_VALID, normalised, student.detach().float()))
    return teacher
