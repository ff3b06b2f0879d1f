from nnunet_kd.losses.class_affinity import ClassAffinityKDLoss, class_affinity
from nnunet_kd.losses.deep_supervision import DeepSupervisionKD, kd_scale_weights, parse_scale_weights, resample_logits
from nnunet_kd.losses.soft_output import LogitMatchingLoss, SoftTargetKDLoss

__all__ = ["ClassAffinityKDLoss", "DeepSupervisionKD", "LogitMatchingLoss", "SoftTargetKDLoss", "class_affinity",
           "kd_scale_weights", "parse_scale_weights", "resample_logits"]
