"""The wiring every output-space distillation trainer shares; concrete trainers live in `trainers/`.

A KD trainer is an ordinary nnUNetTrainer whose network is the student. The teacher is loaded, checked and frozen at
the start of training, outside `self.network`, so checkpoints, validation and `nnUNetv2_predict` see only the
student, rebuilt from the plans by the inherited static `build_network_architecture`.
"""
from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist

from nnunet_kd import __version__
from nnunet_kd.cpu_inference import build_network_with_onednn
from nnunet_kd.errors import KDConfigurationError
from nnunet_kd.losses import DeepSupervisionKD, kd_scale_weights
from nnunet_kd.progress import KDLocalLogger
from nnunet_kd.schedule import SCHEDULE_ATTRIBUTES, apply_schedule_from_environment
from nnunet_kd.seeding import ENV_SEED, seed_from_environment
from nnunet_kd.settings import SETTINGS_FILE, BaseKDSettings, KDSettings, read_settings_file, write_settings_file
from nnunet_kd.teacher import (
    ENV_TEACHER,
    ENV_TEACHER_CHECKPOINT,
    ENV_TEACHER_FOLDS,
    FrozenTeacher,
    TeacherSpec,
    check_teacher_files,
    compatibility_problems,
    file_sha256,
    load_teacher,
    resolve_teacher_spec,
)
from nnunet_kd.training import backward_and_step, batch_to_device


class nnUNetTrainerKD(nnUNetTrainer):
    """`L = w_seg · L_seg(deep supervision) + Σ_k w_k · L_k(student, teacher)`.

    Single-term trainers implement `build_kd_loss` (`L = L_seg + alpha · L_KD`, on the scales of the `scales`
    setting); multi-term ones override `build_kd_terms`, `seg_loss_weight` and `kd_loss_parts`.
    """

    kd_defaults: ClassVar[BaseKDSettings] = KDSettings()
    # what train_step returns besides 'loss'; each is logged per epoch as 'train_<part>' and drawn in progress.png
    kd_loss_parts: ClassVar[tuple[str, ...]] = ("seg_loss", "kd_loss")
    # whether the KD terms compare deep-supervision outputs with the teacher's own (multi-scale KD)
    teacher_deep_supervision: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = seed_from_environment()
        apply_schedule_from_environment(self)
        self.kd_settings = self.kd_defaults.with_environment()
        self.teacher_spec = resolve_teacher_spec(os.environ.get("nnUNet_results"), self.plans_manager.dataset_name,
                                                 configuration, fold)
        self.teacher: FrozenTeacher | None = None
        self.kd_terms: dict[str, tuple[nn.Module, float]] = {}
        self._recorded_run: dict | None = None  # what kd_settings.json said when resuming
        self.logger.local_logger = KDLocalLogger([f"train_{p}" for p in self.kd_loss_parts])

    def build_kd_loss(self, activation: str) -> nn.Module:
        """The per-output KD loss `(student_logits, teacher_logits) -> scalar`; 'softmax' or 'sigmoid' outputs."""
        raise NotImplementedError

    def build_kd_terms(self, activation: str, num_outputs: int) -> dict[str, tuple[nn.Module, float]]:
        """Each KD term: name -> (module(student_output, teacher_output) -> scalar, its weight in the total loss)."""
        weights = kd_scale_weights(num_outputs, self.kd_settings.scales)
        return {"kd_loss": (DeepSupervisionKD(self.build_kd_loss(activation), weights), self.kd_settings.alpha)}

    @property
    def seg_loss_weight(self) -> float:
        return 1.0

    # nnU-Net's network from the plans, with convolutions that stay fast on the CPU for small students
    build_network_architecture = staticmethod(build_network_with_onednn)

    # ---- start-up: everything that can be wrong is checked before nnU-Net writes a file or runs a step ----
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()  # builds the student only: cheap, and needed to report its size
        self._prepare_distillation()
        super().on_train_start()

    def _prepare_distillation(self) -> None:
        dataset, configuration = self.plans_manager.dataset_name, self.configuration_name
        ignored = self.kd_defaults.ignored_environment(
            other_known=(ENV_TEACHER, ENV_TEACHER_FOLDS, ENV_TEACHER_CHECKPOINT, ENV_SEED, *SCHEDULE_ATTRIBUTES))
        if ignored:
            self.print_to_log_file(f"WARNING: {ignored} are set but {type(self).__name__} does not use them.")
        if self.current_epoch > 0 and self._recorded_run is None:
            raise KDConfigurationError(f"Cannot resume exactly: {SETTINGS_FILE} is missing from {self.output_folder}."
                                       f" Restore it, or start a new training without --c.")
        check_teacher_files(self.teacher_spec, dataset, configuration)
        checksums = [file_sha256(p) for p in self.teacher_spec.checkpoint_paths()]
        if self._recorded_run is not None and checksums != self._recorded_run["teacher"]["checkpoint_sha256"]:
            raise KDConfigurationError(
                f"The teacher checkpoint(s) {[str(p) for p in self.teacher_spec.checkpoint_paths()]} changed since "
                f"this training started, so resuming with --c would not continue the same run. Restore the original "
                f"teacher, or start a new training without --c.")

        teacher = load_teacher(self.teacher_spec, self.device, self.teacher_deep_supervision)
        problems = compatibility_problems(teacher.plans_manager, teacher.configuration_manager, teacher.dataset_json,
                                          self.plans_manager, self.configuration_manager, self.dataset_json)
        if problems:
            raise KDConfigurationError(f"The teacher {self.teacher_spec.model_folder} cannot teach this student "
                                       f"({self.plans_manager.plans_name}, {configuration}):\n  - "
                                       + "\n  - ".join(problems))
        self.teacher = teacher.module
        num_outputs = len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else 1
        activation = "sigmoid" if self.label_manager.has_regions else "softmax"
        self.kd_terms = self.build_kd_terms(activation, num_outputs)
        if ("seg_loss", *self.kd_terms) != tuple(self.kd_loss_parts[:1 + len(self.kd_terms)]):
            raise RuntimeError(f"{type(self).__name__}.kd_loss_parts {self.kd_loss_parts} must start with 'seg_loss' "
                               f"and the KD terms {list(self.kd_terms)}")

        padding = self.teacher.padding_for(self.configuration_manager.patch_size)
        student_parameters = sum(p.numel() for p in self.network.parameters())
        record = {
            "trainer": type(self).__name__,
            "nnunet_kd_version": __version__,
            "seed": self.seed,
            "schedule": {"num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                         "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch},
            "settings": self.kd_settings.to_json(),
            "loss": {"activation": activation, "seg_weight": self.seg_loss_weight,
                     "terms": {name: {"weight": weight, "weights_per_output": getattr(module, "weights", None)}
                               for name, (module, weight) in self.kd_terms.items()}},
            "teacher": {**self.teacher_spec.to_json(), "trainer": teacher.trainer_name,
                        "plans": teacher.plans_manager.plans_name,
                        "data_identifier": teacher.configuration_manager.data_identifier,
                        "patch_size": list(teacher.configuration_manager.patch_size),
                        "num_parameters": teacher.num_parameters, "checkpoint_sha256": checksums,
                        "input_padding": padding},
            "student": {"plans": self.plans_manager.plans_name, "configuration": configuration,
                        "patch_size": list(self.configuration_manager.patch_size),
                        "num_parameters": student_parameters},
            **self.kd_record_extras(),
        }
        self.print_to_log_file(f"Knowledge distillation ({type(self).__name__}): settings {record['settings']}, "
                               f"loss {record['loss']}\n"
                               f"teacher {self.teacher_spec.model_folder} folds {list(self.teacher_spec.folds)} "
                               f"{self.teacher_spec.checkpoint_name}: {teacher.num_parameters:,} parameters; "
                               f"student: {student_parameters:,} parameters", also_print_to_console=True)
        if any(padding):
            self.print_to_log_file(f"The student patch {list(self.configuration_manager.patch_size)} is not a "
                                   f"multiple of the teacher's stride {self.teacher.divisor}; teacher inputs are "
                                   f"zero-padded by {padding} voxels and its logits cropped back.",
                                   also_print_to_console=True)
        if self.local_rank == 0:
            write_settings_file(self.output_folder, record)

    def kd_record_extras(self) -> dict:
        """What a trainer adds to kd_settings.json besides the settings, the loss, the teacher and the student."""
        return {}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # the recorded settings first: they may shape what loading builds (e.g. the growing assistant's master network)
        self._adopt_recorded_settings()
        super().load_checkpoint(filename_or_checkpoint)

    def _adopt_recorded_settings(self) -> None:
        record = read_settings_file(self.output_folder)
        if record is None:
            return  # fine for --val; _prepare_distillation refuses to resume training without it
        self._recorded_run = record
        recorded_settings = type(self.kd_defaults)(**record["settings"])
        recorded_teacher = TeacherSpec(record["teacher"]["model_folder"], tuple(record["teacher"]["folds"]),
                                       record["teacher"]["checkpoint_name"])
        if (recorded_settings, recorded_teacher) != (self.kd_settings, self.teacher_spec):
            self.print_to_log_file(f"Resuming with the settings this training started with ({SETTINGS_FILE}): "
                                   f"{recorded_settings}, teacher {recorded_teacher}; the current environment asked "
                                   f"for {self.kd_settings}, teacher {self.teacher_spec}.", also_print_to_console=True)
        self.kd_settings, self.teacher_spec = recorded_settings, recorded_teacher

    # ---- training ----
    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            teacher_output = self.teacher(data)
            output = self.network(data)
            parts = {"seg_loss": self.loss(output, target)}
            parts.update({name: module(output, teacher_output) for name, (module, _) in self.kd_terms.items()})
            loss = self.seg_loss_weight * parts["seg_loss"] + sum(weight * parts[name]
                                                                  for name, (_, weight) in self.kd_terms.items())
        backward_and_step(loss, self.optimizer, self.grad_scaler)
        return {"loss": loss.detach().cpu().numpy(), **{k: v.detach().cpu().numpy() for k, v in parts.items()}}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        parts = {}
        for part in self.kd_loss_parts:
            values = outputs[part]
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                values = np.vstack(gathered)
            parts[part] = float(np.mean(values))
            self.logger.log(f"train_{part}", parts[part], self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
