"""Stage 2 of the spine pipeline learns "the highest vertebra in the patch not yet in memory": a patch mirrored
head-feet asks for the lowest one instead, so nnU-Net's mirroring, in training and as test-time augmentation, must
leave the head-feet axis alone. The scans are in one orientation (`nnunet_kd.spine.verse.canonical`: head-feet is
array axis 0), which nnU-Net's plans may move (`transpose_forward`)."""
from __future__ import annotations

from collections.abc import Sequence


def without_head_feet(mirror_axes: Sequence[int] | None, transpose_forward: Sequence[int]) -> tuple[int, ...] | None:
    """`mirror_axes` (of the preprocessed, transposed array) without the one that holds the scans' axis 0."""
    if mirror_axes is None:
        return None
    head_feet = list(transpose_forward).index(0)
    return tuple(axis for axis in mirror_axes if axis != head_feet)


class HeadFeetUnmirrored:
    """Mixin for an nnUNetTrainer of stage 2: nnU-Net's mirroring except along head-feet, in training and in the
    axes the checkpoint allows for test-time mirroring (`inference_allowed_mirroring_axes`)."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        mirror_axes = without_head_feet(mirror_axes, self.plans_manager.transpose_forward)
        self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes
