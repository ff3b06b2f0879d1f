from nnunet_kd.losses.barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from nnunet_kd.losses.class_affinity import ClassAffinityKDLoss, class_affinity
from nnunet_kd.losses.deep_supervision import DeepSupervisionKD, kd_scale_weights, parse_scale_weights, resample_logits
from nnunet_kd.losses.soft_output import LogitMatchingLoss, SoftTargetKDLoss

__all__ = ["BarlowTwinsLoss", "ClassAffinityKDLoss", "DeepSupervisionKD", "LogitMatchingLoss", "SoftTargetKDLoss",
           "barlow_twins_loss", "class_affinity", "kd_scale_weights", "parse_scale_weights", "resample_logits"]
