"""Soft-output KD (Hinton et al. 2015; for vertebrae CT: Serrador et al. 2024).

`L = L_seg + alpha · T² · KL(σ(z_t/T) || σ(z_s/T))`, per-voxel normalised; σ is a softmax for label-based tasks and a
per-channel sigmoid for region-based ones. Environment overrides: nnUNet_KD_alpha, nnUNet_KD_temperature,
nnUNet_KD_scales, nnUNet_KD_warmup.
"""
from dataclasses import replace

from nnunet_kd.core.output_space import nnUNetTrainerKD
from nnunet_kd.core.settings import SoftTargetSettings
from nnunet_kd.losses import SoftTargetKDLoss


class nnUNetTrainerKDLogits(nnUNetTrainerKD):
    kd_defaults = SoftTargetSettings(alpha=1.0, temperature=2.0, scales="full")

    def build_kd_loss(self, activation: str):
        return SoftTargetKDLoss(self.kd_settings.temperature, activation)


class nnUNetTrainerKDLogits_T1(nnUNetTrainerKDLogits):
    kd_defaults = replace(nnUNetTrainerKDLogits.kd_defaults, temperature=1.0)


class nnUNetTrainerKDLogits_T4(nnUNetTrainerKDLogits):
    kd_defaults = replace(nnUNetTrainerKDLogits.kd_defaults, temperature=4.0)


class nnUNetTrainerKDLogits_alpha05(nnUNetTrainerKDLogits):
    kd_defaults = replace(nnUNetTrainerKDLogits.kd_defaults, alpha=0.5)


class nnUNetTrainerKDLogits_allScales(nnUNetTrainerKDLogits):
    kd_defaults = replace(nnUNetTrainerKDLogits.kd_defaults, scales="all")


class nnUNetTrainerKDLogits_warmup(nnUNetTrainerKDLogits):
    # the KD weight rises over the first quarter of the epochs: the segmentation loss leads while the student is new
    kd_defaults = replace(nnUNetTrainerKDLogits.kd_defaults, warmup=0.25)
