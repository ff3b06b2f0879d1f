"""Stage 2 of the spine pipeline (one vertebra at a time, `nnunet_kd spine`): nnU-Net's trainers with mirroring
except along head-feet, in training and at prediction (nnunet_kd.spine.training). Train the stage-2 dataset that
`nnunet_kd spine convert` writes with these instead of their stock namesakes; the search reorients every CT the way
the converted patches are, so head is always up."""
from nnUNetTrainerKDLogits import nnUNetTrainerKDLogits
from nnUNetTrainerStudent import nnUNetTrainerStudent
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.spine.training import HeadFeetUnmirrored


class nnUNetTrainerSpineStage2(HeadFeetUnmirrored, nnUNetTrainer):
    """The stage-2 teacher."""


class nnUNetTrainerSpineStage2Student(HeadFeetUnmirrored, nnUNetTrainerStudent):
    """A compact stage-2 student without KD (the baseline of a study)."""


class nnUNetTrainerSpineStage2KDLogits(HeadFeetUnmirrored, nnUNetTrainerKDLogits):
    """A compact stage-2 student with soft-output KD from a stage-2 teacher (Serrador et al. 2024)."""
