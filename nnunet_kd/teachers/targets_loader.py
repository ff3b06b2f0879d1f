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

Top-k targets (`nnunet_kd.teachers.compact_targets`) hold class indices, which no interpolation may blend; and
resampling them costs the same whatever the number of classes only if they are not expanded first. So the
augmentation moves a field of source coordinates instead (the voxel grid of the loader's crop, linearly resampled:
exact for the affine and elastic transforms, and mirrored with the image), and after it each voxel takes the stored
indices and values of its nearest source voxel. The train step expands them to every class on the device
(`decode_top_k`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.losses.deep_supervision import resample_logits
from nnunet_kd.teachers.compact_targets import decode_top_k
from nnunet_kd.teachers.stored_targets import FORMATS, StoredTargets, case_arrays

# below this share of valid voxels (after interpolation) a target voxel lies in padding the teacher never saw
MIN_VALID = 0.5


class _ChannelStack:
    """Image channels, the stored arrays' channels and a validity channel of ones, as one array nnU-Net's loader
    crops.

    Only the cropped region is read (blosc2 decompresses the chunks it touches), like the loader's own crop.
    """

    def __init__(self, image, *stored) -> None:
        self.arrays = (image, *stored)
        self.shape = (sum(a.shape[0] for a in self.arrays) + 1, *image.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        spatial = (slice(None), *index[1:])
        parts = [np.asarray(a[spatial], dtype=np.float32) for a in self.arrays]
        return np.concatenate([*parts, np.ones((1, *parts[0].shape[1:]), np.float32)])[index[0]]


class TargetsDataset:
    """An nnU-Net dataset whose cases carry the stored teacher targets as extra channels (see `_ChannelStack`):
    dense targets as their K channels, top-k targets as k index channels then k + 1 value channels."""

    def __init__(self, dataset, targets: StoredTargets) -> None:
        self.dataset, self.targets = dataset, targets
        self.identifiers = dataset.identifiers

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def load_case(self, identifier: str):
        import blosc2

        data, seg, seg_previous, properties = self.dataset.load_case(identifier)
        values, *indices = [blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, mmap_mode="r")
                            for path in case_arrays(self.targets.folder, identifier, self.targets.manifest)]
        if tuple(values.shape[1:]) != tuple(data.shape[1:]):
            raise KDConfigurationError(f"Stored teacher targets of {identifier} have shape {values.shape[1:]}, its "
                                       f"preprocessed image {data.shape[1:]}: the targets are from other "
                                       f"preprocessing. Write them again (`nnunet_kd teacher-targets --force`).")
        return _ChannelStack(data, *indices, values), seg, seg_previous, properties


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


class _SplitTopKTargets(BasicTransform):
    """Top-k channels set aside unaugmented; the regression target becomes the crop's voxel coordinates, a coverage
    channel (1 inside the crop: where the spatial transform samples outside it, it pads every channel with 0, and
    coordinates are divided by the coverage) and the validity channel."""

    def __init__(self, num_image_channels: int) -> None:
        super().__init__()
        self.num_image_channels = num_image_channels

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict["image"]
        spatial = image.shape[1:]
        coordinates = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial],
                                                 indexing="ij"))
        data_dict["kd_top_k_source"] = image[self.num_image_channels:-1]
        data_dict["regression_target"] = torch.cat([coordinates, torch.ones_like(image[-1:]), image[-1:]])
        data_dict["image"] = image[:self.num_image_channels]
        return data_dict


class _GatherTopKTargets(BasicTransform):
    """After augmentation: each voxel's top-k indices and values from its nearest source voxel, then the validity,
    behind the image channels."""

    def apply(self, data_dict: dict, **params) -> dict:
        source = data_dict.pop("kd_top_k_source")
        moved = data_dict.pop("regression_target")
        spatial_dims = source.ndim - 1
        coordinates, coverage, validity = moved[:spatial_dims], moved[spatial_dims], moved[spatial_dims + 1:]
        flat_index = torch.zeros(coordinates.shape[1:], dtype=torch.long)
        for axis, size in enumerate(source.shape[1:]):
            position = (coordinates[axis] / coverage.clamp_min(1e-3)).round().long().clamp_(0, size - 1)
            flat_index = flat_index * size + position
        gathered = source.reshape(source.shape[0], -1)[:, flat_index.reshape(-1)].reshape(
            source.shape[0], *flat_index.shape)
        data_dict["image"] = torch.cat([data_dict["image"], gathered, validity])
        return data_dict


def with_stored_targets(transforms: ComposeTransforms, num_image_channels: int,
                        target_format: str = FORMATS["dense"]) -> ComposeTransforms:
    """nnU-Net's training transforms, with the stored targets carried through them in lock step with the image."""
    if target_format == FORMATS["topk"]:
        return ComposeTransforms([_SplitTopKTargets(num_image_channels), *transforms.transforms,
                                  _GatherTopKTargets()])
    return ComposeTransforms([_SplitTargets(num_image_channels), *transforms.transforms, _AppendTargets()])


def split_batch(data: torch.Tensor, num_image_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of (image, targets, validity) channels -> the image, and the targets with their validity."""
    return data[:, :num_image_channels], data[:, num_image_channels:]


def dense_targets(stored: torch.Tensor, manifest: dict, num_classes: int,
                  tail_weights: torch.Tensor | None = None) -> torch.Tensor:
    """A batch's stored target channels (validity last) as the teacher's dense output (validity last): top-k
    targets expanded to every class, their tails divided by `tail_weights` (`StoredTargets.tail_weights`), dense
    ones as they are."""
    if manifest["format"] != FORMATS["topk"]:
        return stored
    k = manifest["top_k"]
    decoded = decode_top_k(stored[:, :k], stored[:, k:2 * k + 1], num_classes, weights=tail_weights)
    return torch.cat([decoded, stored[:, -1:].float()], 1)


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
