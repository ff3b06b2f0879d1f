"""A compact student trained without distillation: the stock nnUNetTrainer, with the KD trainers' CPU-fast network.

It is the fair baseline for a KD student: same plans, same schedule, same network build (convolutions routed to
oneDNN for CPU inference, see nnunet_kd/cpu_inference.py), only the KD term missing.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.cpu_inference import build_network_with_onednn


class nnUNetTrainerStudent(nnUNetTrainer):
    build_network_architecture = staticmethod(build_network_with_onednn)
