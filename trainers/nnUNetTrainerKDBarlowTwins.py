"""Single-stage Barlow Twins KD for a student that sees fewer modalities (Choi et al., CMPB 2023).

Teacher (all channels) and student (the channels named by nnUNet_KD_student_channels) share the plans architecture
and train together from scratch, with one optimiser:
`L = L_seg(student) + L_seg(teacher) + barlow_weight · L_BT(student bottleneck, teacher bottleneck)`,
each L_seg nnU-Net's Dice+CE with deep supervision, L_BT on the output of the encoder's last stage (forward hooks),
every bottleneck voxel a sample. `self.network` is the student: checkpoints, validation and `nnUNetv2_predict` see it
alone, and its model folder's dataset.json and plans.json describe only its channels. The teacher is a complete
model folder of its own, `<model folder>/teacher/` (for nnUNetv2_predict_from_modelfolder), written with the final and
best student checkpoints; teacher and projector weights travel in each checkpoint's companion file
(nnunet_kd.core.run_core), so --c resumes exactly. Under DDP the teacher and the projector train in wrappers of their
own beside nnU-Net's student wrapper, and L_BT is that of every rank's voxels together. Environment overrides: see
nnunet_kd.core.settings.BarlowTwinsSettings.
"""
from __future__ import annotations

import os
import shutil
from typing import ClassVar

import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from torch import nn

from nnunet_kd.core.checkpoints import num_parameters
from nnunet_kd.core.run_core import batch_to_device, nnUNetTrainerKDRun
from nnunet_kd.core.settings import SETTINGS_FILE, BarlowTwinsSettings, KDConfigurationError
from nnunet_kd.losses import BarlowTwinsLoss
from nnunet_kd.students.modalities import build_network_checking_channels, select_channels

TEACHER_FOLDER = "teacher"


def _bottleneck(network: nn.Module) -> nn.Module:
    encoder = getattr(network, "encoder", None)
    if encoder is None or not hasattr(encoder, "stages"):
        raise KDConfigurationError(f"Barlow Twins KD reads bottleneck features from `encoder.stages[-1]`, which "
                                   f"{type(network).__name__} lacks; use a PlainConvUNet or ResidualEncoderUNet plan.")
    return encoder.stages[-1]


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][-1].out_channels


class nnUNetTrainerKDBarlowTwins(nnUNetTrainerKDRun):
    kd_defaults: ClassVar[BarlowTwinsSettings] = BarlowTwinsSettings()
    kd_loss_parts: ClassVar[tuple[str, ...]] = ("student_seg_loss", "teacher_seg_loss", "barlow_twins_loss")
    # hooks added to a compiled network are not traced, and the teacher is a second network: stay eager
    compiles = False
    # the student; stock nnUNetv2_predict rebuilds it from the model folder, which lists only the student's channels
    build_network_architecture = staticmethod(build_network_checking_channels)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.channels_request = self.kd_settings.student_channels or None
        self.teacher: nn.Module | None = None
        self.barlow_twins: BarlowTwinsLoss | None = None
        # what the step calls: their DDP wrappers under DDP (checkpoints hold the modules), else the modules themselves
        self.synced_teacher: nn.Module | None = None
        self.synced_barlow_twins: nn.Module | None = None
        self._features: dict[str, torch.Tensor] = {}
        self._capture = False

    @property
    def teacher_output_folder(self) -> str:
        return os.path.join(self.output_folder_base, TEACHER_FOLDER)

    def _teacher_checkpoint(self, filename: str) -> str:
        return os.path.join(self.teacher_output_folder, f"fold_{self.fold}", os.path.basename(filename))

    # ---- set-up: the student's view of the data replaces the dataset's (StudentChannelsMixin) ----
    def initialize(self):
        if not self.was_initialized and not self.channels_request:
            select_channels(self.full_dataset_json, "")  # required: says which channels there are to choose
        super().initialize()
        # Each trained module in a DDP wrapper of its own, not one wrapper around student, teacher and projector:
        # nnU-Net's checkpoints, validation and deep-supervision switch need `self.network` to wrap the student alone,
        # and a parameter in two wrappers would be reduced twice. The wrappers reduce in the backward pass's order,
        # which is the same on every rank.
        self.synced_teacher = self.ddp_wrapped(self.teacher)
        self.synced_barlow_twins = self.ddp_wrapped(self.barlow_twins)

    def configure_optimizers(self):
        if self.teacher is None:  # built after the student, so nnUNet_KD_seed starts it like a plain student
            self._build_teacher()
        return self.sgd_over([*self.network.parameters(), *self.teacher.parameters(),
                              *self.barlow_twins.parameters()])

    def _build_teacher(self) -> None:
        self.teacher = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, len(self.channels.all_names),
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        student_bottleneck, teacher_bottleneck = _bottleneck(self.network), _bottleneck(self.teacher)
        self.barlow_twins = BarlowTwinsLoss(_out_channels(student_bottleneck), self.kd_settings.barlow_lambda,
                                            self.kd_settings.projector_dim, len(self.configuration_manager.patch_size),
                                            ddp=self.is_ddp).to(self.device)
        student_bottleneck.register_forward_hook(self._keep_features("student"))
        teacher_bottleneck.register_forward_hook(self._keep_features("teacher"))

    def _keep_features(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._capture:
                self._features[name] = output
        return hook

    # ---- start: settings, resume checks, and the model folders of student and teacher ----
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.check_run_environment()
        # nnU-Net writes the student's plans.json and dataset.json into the model folder (they replaced the dataset's)
        super().on_train_start()
        student_parameters = num_parameters(self.network)
        teacher_parameters = num_parameters(self.teacher)
        record = self.run_record(
            channels=self.channels.to_json(),
            loss={"student_seg_weight": 1.0, "teacher_seg_weight": 1.0,
                  "barlow_twins_weight": self.kd_settings.barlow_weight},
            student={"num_parameters": student_parameters},
            teacher={"num_parameters": teacher_parameters, "model_folder": self.teacher_output_folder},
            projector_parameters=num_parameters(self.barlow_twins))
        if self.local_rank == 0:
            os.makedirs(os.path.join(self.teacher_output_folder, f"fold_{self.fold}"), exist_ok=True)
            save_json(self.full_plans, os.path.join(self.teacher_output_folder, "plans.json"), sort_keys=False)
            save_json(self.full_dataset_json, os.path.join(self.teacher_output_folder, "dataset.json"),
                      sort_keys=False)
            shutil.copyfile(os.path.join(self.output_folder_base, "dataset_fingerprint.json"),
                            os.path.join(self.teacher_output_folder, "dataset_fingerprint.json"))
        self.save_run_record(record)
        self.warn_about_channel_crops()
        self.print_to_log_file(f"Barlow Twins KD ({type(self).__name__}): settings {record['settings']}; student "
                               f"channels {list(self.channels.names)} of {list(self.channels.all_names)}; student "
                               f"{student_parameters:,} parameters, teacher {teacher_parameters:,} parameters "
                               f"(saved to {self.teacher_output_folder})", also_print_to_console=True)

    def adopt_recorded_run(self, record: dict) -> None:
        recorded = BarlowTwinsSettings(**record["settings"])
        if recorded != self.kd_settings and self.was_initialized:
            raise KDConfigurationError(f"This trainer was built with {self.kd_settings}, but the checkpoint was "
                                       f"trained with {recorded} ({SETTINGS_FILE}).")
        super().adopt_recorded_run(record)  # before initialize() builds the student for its channels

    # ---- checkpoints: teacher and projector in the companion file; the teacher's model folder for prediction ----
    def kd_state(self) -> dict | None:
        if self.teacher is None:
            return None
        return {"teacher_weights": self.teacher.state_dict(), "projector_weights": self.barlow_twins.state_dict()}

    def load_kd_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher_weights"])
        self.barlow_twins.load_state_dict(state["projector_weights"])

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if os.path.basename(filename) in ("checkpoint_final.pth", "checkpoint_best.pth") and self.teacher is not None:
            self.save_network_checkpoint(self.teacher, self._teacher_checkpoint(filename))

    # ---- training and validation ----
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.synced_teacher.train()
        self.synced_barlow_twins.train()

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)

        self.optimizer.zero_grad(set_to_none=True)
        parts = self.loss_parts(data, target)
        loss = parts["student_seg_loss"] + parts["teacher_seg_loss"] + \
            self.kd_settings.barlow_weight * parts["barlow_twins_loss"]
        return self.finish_step(loss, parts)

    def loss_parts(self, data: torch.Tensor, target) -> dict[str, torch.Tensor]:
        """Both networks on one batch of full-channel data: each one's L_seg and L_BT between their bottlenecks."""
        self._capture = True
        try:
            with self.autocast():
                teacher_output = self.synced_teacher(data)
                student_output = self.network(self.student_input(data))
                parts = {"student_seg_loss": self.loss(student_output, target),
                         "teacher_seg_loss": self.loss(teacher_output, target)}
            teacher_features = self._features["teacher"]
            if not self.kd_settings.teacher_receives_kd:
                teacher_features = teacher_features.detach()
            parts["barlow_twins_loss"] = self.synced_barlow_twins(self._features["student"], teacher_features)  # fp32
        finally:
            self._capture = False
            self._features.clear()
        return parts

