from nnunet_kd.losses.deep_supervision import DeepSupervisionKD, kd_scale_weights, resample_logits
from nnunet_kd.losses.soft_output import LogitMatchingLoss, SoftTargetKDLoss

__all__ = ["DeepSupervisionKD", "LogitMatchingLoss", "SoftTargetKDLoss", "kd_scale_weights", "resample_logits"]
