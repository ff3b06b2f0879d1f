"""Multi-scale KD with soft targets and class affinity (Zhao et al., IEEE TMI 2023): the paper's combination.

`L = 0.8 · L_seg + 0.2 · Σ_i w_i · T²·KL_i + 0.1 · Σ_i w_i · CAKD_i`, w = 0.4, 0.2, 0.2, 0.2 over the four
decoder scales (full resolution first), each against the teacher's own deep-supervision output of that resolution
(area-resampled from its full resolution where the teacher has none). The soft-target term is a correct per-voxel
KL; the public code's "feature-normalised" term has no gradient. Environment overrides: nnUNet_KD_seg_weight,
nnUNet_KD_soft_weight, nnUNet_KD_affinity_weight, nnUNet_KD_temperature, nnUNet_KD_scale_weights.
"""
from dataclasses import replace

from nnunet_kd.core.output_space import nnUNetTrainerKD
from nnunet_kd.core.settings import MultiScaleSettings
from nnunet_kd.losses import ClassAffinityKDLoss, DeepSupervisionKD, SoftTargetKDLoss, parse_scale_weights


class nnUNetTrainerKDMultiScale(nnUNetTrainerKD):
    kd_defaults = MultiScaleSettings()
    kd_loss_parts = ("seg_loss", "soft_loss", "affinity_loss")
    teacher_deep_supervision = True

    @property
    def seg_loss_weight(self) -> float:
        return self.kd_settings.seg_weight

    def build_kd_terms(self, activation: str, num_outputs: int):
        weights = parse_scale_weights(self.kd_settings.scale_weights, num_outputs)
        temperature = self.kd_settings.temperature
        return {
            "soft_loss": (DeepSupervisionKD(SoftTargetKDLoss(temperature, activation), weights),
                          self.kd_settings.soft_weight),
            "affinity_loss": (DeepSupervisionKD(ClassAffinityKDLoss(temperature, activation), weights),
                              self.kd_settings.affinity_weight),
        }


class nnUNetTrainerKDMultiScale_strongKD(nnUNetTrainerKDMultiScale):
    # The paper's 0.2 / 0.1 weights fine-tune a student already trained; from scratch they make the KD terms about a
    # tenth of KDLogits's. Five times both, their ratio kept, to tell whether the weights are what limits it.
    kd_defaults = replace(nnUNetTrainerKDMultiScale.kd_defaults, soft_weight=1.0, affinity_weight=0.5)
