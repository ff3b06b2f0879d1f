"""Class-affinity KD (Zhao et al., IEEE TMI 2023), on its own.

`L = L_seg + alpha · CAKD`, CAKD = mean over classes j of `1 - cos(M_t[:, j], M_s[:, j])` with the class-affinity
matrix `M = P Pᵀ / N` per sample. Environment overrides: nnUNet_KD_alpha, nnUNet_KD_temperature, nnUNet_KD_scales.
"""
from dataclasses import replace

from nnunet_kd.core.output_space import nnUNetTrainerKD
from nnunet_kd.core.settings import SoftTargetSettings
from nnunet_kd.losses import ClassAffinityKDLoss


class nnUNetTrainerKDClassAffinity(nnUNetTrainerKD):
    # CAKD lies in [0, 1] and is small once the student's class layout is right: alpha 1 keeps it noticeable
    kd_defaults = SoftTargetSettings(alpha=1.0, temperature=1.0, scales="full")

    def build_kd_loss(self, activation: str):
        return ClassAffinityKDLoss(self.kd_settings.temperature, activation)


class nnUNetTrainerKDClassAffinity_allScales(nnUNetTrainerKDClassAffinity):
    kd_defaults = replace(nnUNetTrainerKDClassAffinity.kd_defaults, scales="all")
