"""A compact student trained without distillation: the stock nnUNetTrainer, with the KD trainers' CPU-fast network.

It is the fair baseline for a KD student: same plans, same schedule, same network build (convolutions routed to
oneDNN for CPU inference, see nnunet_kd/deploy/cpu_inference.py), the same `nnUNet_KD_seed`, and with
`nnUNet_KD_student_channels` the same channels of the same preprocessed cases; only the KD term missing.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.core.schedule import apply_schedule_from_environment, seed_from_environment
from nnunet_kd.deploy.cpu_inference import build_network_with_onednn
from nnunet_kd.students.modalities import StudentChannelsMixin


class nnUNetTrainerStudent(StudentChannelsMixin, nnUNetTrainer):
    build_network_architecture = staticmethod(build_network_with_onednn)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # like the KD trainers: nnUNet_KD_seed makes a KD/no-KD pair start from the same weights
        self.seed = seed_from_environment()
        apply_schedule_from_environment(self)
