"""The wiring every output-space distillation trainer shares; concrete trainers live in `trainers/`.

A KD trainer is an ordinary nnUNetTrainer whose network is the student. The teacher is loaded, checked and frozen at
the start of training, outside `self.network`, so checkpoints, validation and `nnUNetv2_predict` see only the
student, rebuilt from the plans by the inherited static `build_network_architecture`. With
`nnUNet_KD_teacher_targets` no teacher is loaded: the teacher's stored outputs come with each batch through nnU-Net's
data loader and augmentation (`nnunet_kd.teachers.stored_targets`). The run's bookkeeping (seed, settings, run record,
resume, loss-part logging) is the shared core's (`nnunet_kd.core.run_core`).

With `nnUNet_KD_student_channels` the student sees only some of the dataset's channels (privileged-modality KD): the
teacher, trained on every channel, gets all of them of the same augmented patch (or its stored targets, computed
once on all channels), the student its own (`nnunet_kd.students.modalities.StudentChannelsMixin`).
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
from torch import nn

from nnunet_kd.core.checkpoints import file_sha256, num_parameters
from nnunet_kd.core.run_core import batch_to_device, nnUNetTrainerKDRun
from nnunet_kd.core.settings import (
    ENV_TEACHER_TARGETS,
    SETTINGS_FILE,
    BaseKDSettings,
    KDConfigurationError,
    KDSettings,
    RunEnvironment,
)
from nnunet_kd.deploy.cpu_inference import build_network_with_onednn
from nnunet_kd.losses import DeepSupervisionKD, kd_scale_weights
from nnunet_kd.teachers.frozen import (
    FrozenTeacher,
    TeacherSpec,
    check_teacher_files,
    compatibility_problems,
    load_teacher,
    resolve_teacher_spec,
)
from nnunet_kd.teachers.stored_targets import FORMATS, StoredTargets
from nnunet_kd.teachers.targets_loader import (
    TargetsDataset,
    dense_targets,
    split_batch,
    teacher_outputs_from_targets,
    with_stored_targets,
)


class nnUNetTrainerKD(nnUNetTrainerKDRun):
    """`L = w_seg · L_seg(deep supervision) + Σ_k w_k · L_k(student, teacher)`.

    Single-term trainers implement `build_kd_loss` (`L = L_seg + alpha · L_KD`, on the scales of the `scales`
    setting); multi-term ones override `build_kd_terms`, `seg_loss_weight` and `kd_loss_parts`.
    """

    kd_defaults: ClassVar[BaseKDSettings] = KDSettings()
    # what train_step returns besides 'loss'; each is logged per epoch as 'train_<part>' and drawn in progress.png
    kd_loss_parts: ClassVar[tuple[str, ...]] = ("seg_loss", "kd_loss")
    # whether the KD terms compare deep-supervision outputs with the teacher's own (multi-scale KD); with stored
    # targets the teacher's lower scales are area-resampled from its full-resolution output instead
    teacher_deep_supervision: ClassVar[bool] = False
    reads_stored_targets = True
    # whether a KD term reads every class's logit alike (logit matching), so that top-k targets, which keep the
    # unlikely classes' total mass but not how it divides among them, would teach it something else
    reads_every_logit: ClassVar[bool] = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_spec = resolve_teacher_spec(os.environ.get("nnUNet_results"), self.plans_manager.dataset_name,
                                                 configuration, fold)
        self.teacher: FrozenTeacher | None = None
        self.targets_request = RunEnvironment.read().teacher_targets  # a name or folder, or None: online teacher
        self.stored_targets: StoredTargets | None = None
        self.tail_weights: torch.Tensor | None = None  # top-k targets: how a voxel's tail divides (compact_targets)
        self.kd_terms: dict[str, tuple[nn.Module, float]] = {}

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

    @property
    def kd_ramp(self) -> float:
        """The share of the KD weights in force this epoch: rises linearly over the `warmup` share of the epochs."""
        warmup_epochs = getattr(self.kd_settings, "warmup", 0.0) * self.num_epochs
        return 1.0 if warmup_epochs <= 0 else min(1.0, (self.current_epoch + 1) / warmup_epochs)

    # nnU-Net's network from the plans, with convolutions that stay fast on the CPU for small students
    build_network_architecture = staticmethod(build_network_with_onednn)

    # ---- start-up: everything that can be wrong is checked before a data loader, checkpoint or step ----
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()  # builds the student only: cheap, and needed to report its size
        self.prepare_distillation()
        super().on_train_start()

    def prepare_distillation(self, teacher: TeacherSpec | None = None, targets: str | None = None) -> None:
        """Check the run and the teacher, load the teacher, build the KD terms and write the run record.

        `teacher` (a teacher network) or `targets` (stored teacher targets: a name or folder) replaces what the
        environment named; tools such as `nnunet_kd bench` pass them explicitly.
        """
        if teacher is not None:
            self.teacher_spec, self.targets_request = teacher, None
        if targets is not None:
            self.targets_request = targets
        self.check_run_environment()
        if self.targets_request is not None:
            self.save_run_record(self.run_record(**self.use_stored_targets()))
            return
        checksums = self.check_teacher()
        self.load_frozen_teacher()
        self.save_run_record(self.run_record(**self.distillation_record(checksums)))

    def use_stored_targets(self) -> dict:
        """Check the stored targets against this run (before any step), build the KD terms; the run record's
        sections."""
        targets = StoredTargets.locate(self.targets_request, self.preprocessed_dataset_folder_base)
        problems = targets.problems(self.full_plans_manager, self.configuration_name, self.full_configuration_manager,
                                    self.full_dataset_json, self.do_split()[0])
        problems += [f"the targets were computed from every channel's crop, but at prediction the student's own "
                     f"files crop differently ({p}): it would predict on other voxels than it learned from; train "
                     f"on channels whose zero regions agree, or distil online" for p in self.channel_crop_problems()]
        if self.reads_every_logit and targets.manifest["format"] == FORMATS["topk"]:
            problems.append(f"{type(self).__name__} matches every class's logit, but top-{targets.manifest['top_k']} "
                            f"targets keep only the most probable classes (the rest share one value); write dense "
                            f"targets for it (`nnunet_kd teacher-targets --format dense`)")
        changed = targets.changed_teacher_checkpoints()
        if changed:
            problems.append(f"the teacher checkpoint(s) {changed} changed since the targets were written; write them "
                            f"again (`nnunet_kd teacher-targets --force`)")
        recorded = (self.recorded_run or {}).get("teacher_targets")
        if recorded is not None and recorded["manifest_sha256"] != targets.digest():
            problems.append(f"they are not the targets this training started with ({recorded['folder']}), so --c "
                            f"would not continue the same run; restore them, or start a new training without --c")
        if problems:
            raise KDConfigurationError(f"{ENV_TEACHER_TARGETS}: the stored teacher targets {targets.folder} cannot "
                                       f"teach this student ({self.plans_manager.plans_name}, "
                                       f"{self.configuration_name}, fold {self.fold}):\n  - " + "\n  - ".join(problems))
        self.stored_targets = targets
        weights = targets.tail_weights(self.do_split()[0])
        self.tail_weights = None if weights is None else weights.to(self.device)
        self.set_kd_terms()
        self.print_to_log_file(f"Knowledge distillation ({type(self).__name__}) from stored teacher targets "
                               f"{targets.folder} (teacher {targets.manifest['teacher']['model_folder']} folds "
                               f"{targets.manifest['teacher']['folds']}, mirroring "
                               f"{targets.manifest['teacher']['mirroring']}): no teacher network is loaded. Settings "
                               f"{self.kd_settings.to_json()}", also_print_to_console=True)
        return {"loss": self.loss_record(), "teacher_targets": targets.record(), "student": self.student_record(),
                **self.kd_record_extras()}

    @property
    def output_activation(self) -> str:
        return "sigmoid" if self.label_manager.has_regions else "softmax"

    @property
    def num_outputs(self) -> int:
        return len(self._get_deep_supervision_scales()) if self.enable_deep_supervision else 1

    def check_teacher(self) -> list[str]:
        """The teacher's files exist and, on --c, are the ones the run started with; returns their SHA-256."""
        check_teacher_files(self.teacher_spec, self.plans_manager.dataset_name, self.configuration_name)
        checksums = [file_sha256(p) for p in self.teacher_spec.checkpoint_paths()]
        if self.recorded_run is not None and checksums != self.recorded_run["teacher"]["checkpoint_sha256"]:
            raise KDConfigurationError(
                f"The teacher checkpoint(s) {[str(p) for p in self.teacher_spec.checkpoint_paths()]} changed since "
                f"this training started, so resuming with --c would not continue the same run. Restore the original "
                f"teacher, or start a new training without --c.")
        return checksums

    def load_frozen_teacher(self) -> None:
        """Load the teacher, refuse it if it would see other voxels or mean other things, build the KD terms."""
        teacher = load_teacher(self.teacher_spec, self.device, self.teacher_deep_supervision)
        # the teacher reads the loader's cases, which have every channel of the dataset whatever the student sees
        problems = compatibility_problems(teacher.plans_manager, teacher.configuration_manager, teacher.dataset_json,
                                          self.full_plans_manager, self.full_configuration_manager,
                                          self.full_dataset_json)
        if problems:
            raise KDConfigurationError(f"The teacher {self.teacher_spec.model_folder} cannot teach this student "
                                       f"({self.plans_manager.plans_name}, {self.configuration_name}):\n  - "
                                       + "\n  - ".join(problems))
        self.teacher = teacher.module
        self._loaded_teacher = teacher
        self.set_kd_terms()
        self.warn_about_channel_crops()

    def set_kd_terms(self) -> None:
        self.kd_terms = self.build_kd_terms(self.output_activation, self.num_outputs)
        if ("seg_loss", *self.kd_terms) != tuple(self.kd_loss_parts[:1 + len(self.kd_terms)]):
            raise RuntimeError(f"{type(self).__name__}.kd_loss_parts {self.kd_loss_parts} must start with 'seg_loss' "
                               f"and the KD terms {list(self.kd_terms)}")

    def distillation_record(self, checksums: list[str]) -> dict:
        """The run record's sections for a frozen-teacher run; also logged."""
        teacher = self._loaded_teacher
        padding = self.teacher.padding_for(self.configuration_manager.patch_size)
        student_parameters = num_parameters(self.network)
        record = {
            "loss": self.loss_record(),
            "teacher": {**self.teacher_spec.to_json(), "trainer": teacher.trainer_name,
                        "plans": teacher.plans_manager.plans_name,
                        "data_identifier": teacher.configuration_manager.data_identifier,
                        "patch_size": list(teacher.configuration_manager.patch_size),
                        "num_parameters": teacher.num_parameters, "checkpoint_sha256": checksums,
                        "input_padding": padding},
            "student": self.student_record(),
            **self.kd_record_extras(),
        }
        self.print_to_log_file(f"Knowledge distillation ({type(self).__name__}): settings "
                               f"{self.kd_settings.to_json()}, loss {record['loss']}\n"
                               f"teacher {self.teacher_spec.model_folder} folds {list(self.teacher_spec.folds)} "
                               f"{self.teacher_spec.checkpoint_name}: {teacher.num_parameters:,} parameters; "
                               f"student: {student_parameters:,} parameters", also_print_to_console=True)
        if any(padding):
            self.print_to_log_file(f"The student patch {list(self.configuration_manager.patch_size)} is not a "
                                   f"multiple of the teacher's stride {self.teacher.divisor}; teacher inputs are "
                                   f"zero-padded by {padding} voxels and its logits cropped back.",
                                   also_print_to_console=True)
        return record

    def loss_record(self) -> dict:
        return {"activation": self.output_activation, "seg_weight": self.seg_loss_weight,
                "terms": {name: {"weight": weight, "weights_per_output": getattr(module, "weights", None)}
                          for name, (module, weight) in self.kd_terms.items()}}

    def student_record(self) -> dict:
        return {"plans": self.plans_manager.plans_name, "configuration": self.configuration_name,
                "patch_size": list(self.configuration_manager.patch_size),
                "num_parameters": num_parameters(self.network),
                "channels": self.channels.to_json() if self.channels is not None else None}

    def kd_record_extras(self) -> dict:
        """What a trainer adds to kd_settings.json besides the settings, the loss, the teacher and the student."""
        return {}

    def adopt_recorded_run(self, record: dict) -> None:
        super().adopt_recorded_run(record)
        stored = record.get("teacher_targets")
        if stored is not None or self.targets_request is not None:
            recorded_request = None if stored is None else stored["folder"]
            if recorded_request != self.targets_request:
                self.print_to_log_file(f"Resuming with the teacher this training started with ({SETTINGS_FILE}): "
                                       f"{'stored targets ' + recorded_request if stored else 'online'}; the current "
                                       f"environment asked for {self.targets_request or 'an online teacher'}.",
                                       also_print_to_console=True)
            self.targets_request = recorded_request
            if stored is not None:
                return
        recorded = TeacherSpec(record["teacher"]["model_folder"], tuple(record["teacher"]["folds"]),
                               record["teacher"]["checkpoint_name"])
        if recorded != self.teacher_spec:
            self.print_to_log_file(f"Resuming with the teacher this training started with ({SETTINGS_FILE}): "
                                   f"{recorded}; the current environment asked for {self.teacher_spec}.",
                                   also_print_to_console=True)
        self.teacher_spec = recorded

    # ---- stored targets: carried by the training data loader, through nnU-Net's augmentation ----
    def get_tr_and_val_datasets(self):
        dataset_train, dataset_val = super().get_tr_and_val_datasets()
        if self.stored_targets is not None:
            dataset_train = TargetsDataset(dataset_train, self.stored_targets)
        return dataset_train, dataset_val

    def get_training_transforms(self, *args, **kwargs):
        # nnU-Net declares this static but calls it on the trainer, so an instance can add its stored targets. The
        # loader's image has the dataset's channels; a cascade adds the previous stage's one-hot channels later, in
        # front of the targets, which is where train_step's split (at num_input_channels) expects them.
        transforms = super().get_training_transforms(*args, **kwargs)
        if self.stored_targets is None:
            return transforms
        return with_stored_targets(transforms, self.num_dataset_channels, self.stored_targets.manifest["format"])

    def inputs_and_targets(self, batch: dict) -> tuple[torch.Tensor, object, torch.Tensor | None]:
        """The batch on the device: image (every channel the loader carries: the teacher's input; `student_input`
        takes the student's), labels, and the stored teacher targets (None: the teacher runs online)."""
        data, target = batch_to_device(batch, self.device)
        if self.stored_targets is None:
            return data, target, None
        data, stored = split_batch(data, self.num_loader_channels)
        return data, target, stored

    def teacher_output(self, data: torch.Tensor, stored: torch.Tensor | None, like):
        """The teacher network's output, or the stored targets at the resolution of each output in `like`."""
        if stored is None:
            return self.teacher(data)
        dense = dense_targets(stored, self.stored_targets.manifest, self.label_manager.num_segmentation_heads,
                              self.tail_weights)
        return teacher_outputs_from_targets(dense, like)

    # ---- training ----
    def train_step(self, batch: dict) -> dict:
        data, target, stored = self.inputs_and_targets(batch)

        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            output = self.network(self.student_input(data))
            teacher_output = self.teacher_output(data, stored, output)
            parts = {"seg_loss": self.loss(output, target)}
            parts.update({name: module(output, teacher_output) for name, (module, _) in self.kd_terms.items()})
            loss = self.seg_loss_weight * parts["seg_loss"] + self.kd_ramp * sum(
                weight * parts[name] for name, (_, weight) in self.kd_terms.items())
        return self.finish_step(loss, parts)
