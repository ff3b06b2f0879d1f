"""Logit matching (Ba & Caruana 2014): MSE between class-centred logits, the high-temperature limit of soft KD.

`L = L_seg + alpha · mean((z_s - mean_k z_s) - (z_t - mean_k z_t))²`; region-based tasks match raw logits.
Environment overrides: nnUNet_KD_alpha, nnUNet_KD_scales.
"""
from dataclasses import replace

from nnunet_kd.core.output_space import nnUNetTrainerKD
from nnunet_kd.core.settings import KDSettings
from nnunet_kd.losses import LogitMatchingLoss


class nnUNetTrainerKDLogitMatching(nnUNetTrainerKD):
    # logits are O(10), so the squared error is much larger than a KL term: a smaller alpha keeps L_seg in charge
    kd_defaults = KDSettings(alpha=0.1, scales="full")
    reads_every_logit = True

    def build_kd_loss(self, activation: str):
        return LogitMatchingLoss(activation)


class nnUNetTrainerKDLogitMatching_allScales(nnUNetTrainerKDLogitMatching):
    kd_defaults = replace(nnUNetTrainerKDLogitMatching.kd_defaults, scales="all")
