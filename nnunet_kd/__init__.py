"""nnunet-kd: knowledge distillation for nnU-Net v2 (trainers, students, teacher handling)."""
__version__ = "0.1.0"
