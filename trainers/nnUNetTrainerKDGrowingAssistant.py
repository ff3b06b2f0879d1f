"""Growing teacher-assistant KD: this project's design, inspired by Xu et al. 2021 (liver CT), whose growth rule is not
published (README, "Growing teacher-assistant KD").

One master network at the assistant's maximum width is trained by one optimiser. The student is the slice made of the
first channels of every layer (its widths come from the student plans, `-p`); the assistant is a wider slice that
grows in stages from just above the student's widths to `max_width` times them. Each step:
`L = L_seg(student) + alpha · KD(assistant -> student, assistant detached)
   + L_seg(assistant) + alpha · KD(teacher -> assistant)`, the teacher frozen.
Growth silences the channels the assistant gains (nnunet_kd/students/growing.py), so it keeps what it has learned.
`self.network` is the student as an ordinary compact network: it receives the slice before every validation and
checkpoint, so `network_weights` and stock `nnUNetv2_predict` see the student alone; the master weights and the
growth stage and schedule travel in the checkpoint's companion file (nnunet_kd.core.run_core), so `--c` resumes
exactly. Under DDP the master is what the ranks synchronise (nnunet_kd.students.growing.SlicedNetworks), so growth needs
no new wrapper.
Environment overrides: nnUNet_KD_alpha, nnUNet_KD_temperature, nnUNet_KD_scales, nnUNet_KD_max_width, nnUNet_KD_stages.
"""
from dataclasses import asdict

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_kd.core.checkpoints import num_parameters
from nnunet_kd.core.output_space import nnUNetTrainerKD
from nnunet_kd.core.settings import GrowingAssistantSettings
from nnunet_kd.losses import SoftTargetKDLoss
from nnunet_kd.students.growing import (
    ChannelSlice,
    GrowthStage,
    SlicedNetworks,
    growth_schedule,
    silence_added_channels,
    stage_at,
)
from nnunet_kd.teachers.frozen import TeacherSpec


class nnUNetTrainerKDGrowingAssistant(nnUNetTrainerKD):
    kd_defaults = GrowingAssistantSettings(alpha=1.0, temperature=2.0, scales="full")
    kd_loss_parts = ("seg_loss", "kd_loss", "assistant_seg_loss", "assistant_kd_loss", "assistant_width")
    compiles = False  # the slices swap weights in and out of their modules, and every growth changes their shapes

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.master = self.assistant = None
        self.student_slice = self.assistant_slice = None
        self.sliced: nn.Module | None = None  # runs the slices: SlicedNetworks, in its DDP wrapper under DDP
        self.schedule: list[GrowthStage] | None = None
        self.stage = -1  # -1: the assistant has not grown beyond the student yet

    def build_kd_loss(self, activation: str):
        return SoftTargetKDLoss(self.kd_settings.temperature, activation)

    @property
    def student_widths(self) -> list[int]:
        return list(self.configuration_manager.network_arch_init_kwargs["features_per_stage"])

    def _network_with_widths(self, widths) -> torch.nn.Module:
        configuration = dict(self.configuration_manager.configuration)
        architecture = dict(configuration["architecture"])
        architecture["arch_kwargs"] = {**architecture["arch_kwargs"], "features_per_stage": list(widths)}
        configuration["architecture"] = architecture
        return self.build_network_architecture(self.plans_manager, ConfigurationManager(configuration),
                                               self.num_input_channels, self.label_manager.num_segmentation_heads,
                                               self.enable_deep_supervision).to(self.device)

    def configure_optimizers(self):
        # nnU-Net's optimiser and schedule, over the master weights (the student is a slice of them)
        max_widths = [round(w * self.kd_settings.max_width) for w in self.student_widths]
        self.master = self._network_with_widths(max_widths)
        return self.sgd_over(self.master.parameters())

    def initialize(self):
        super().initialize()
        # after nnU-Net's DDP wrapping, which replaces the student's BatchNorms by synchronised ones: the slice swaps
        # weights into the modules that run. The student keeps its own normalisation statistics: the assistant's
        # passes must not write into them.
        student = self.network.module if self.is_ddp else self.network
        self.student_slice = ChannelSlice(self.master, student, own_buffers=True)
        # The master's parameters never change shape, so its wrapper lasts the whole run: growth only changes which
        # slices run (the same on every rank, as it follows the epoch) and edits weights the ranks hold alike.
        self.sliced = self.ddp_wrapped(SlicedNetworks(self.master))

    def prepare_distillation(self, teacher: TeacherSpec | None = None, targets: str | None = None) -> None:
        if self.schedule is None:  # a resumed run keeps the schedule its checkpoint holds
            self.schedule = growth_schedule(self.student_widths, self._max_widths(), self.kd_settings.stages,
                                            self.num_epochs)
        super().prepare_distillation(teacher, targets)

    def _max_widths(self) -> list[int]:
        return list(self.master.encoder.output_channels)

    def kd_record_extras(self) -> dict:
        return {"growth": {"student_widths": self.student_widths, "max_widths": self._max_widths(),
                           "master_parameters": num_parameters(self.master),
                           "schedule": [asdict(s) for s in self.schedule]}}

    # ---- growth ----
    def _enter_stage(self, stage: int) -> None:
        self.assistant = self._network_with_widths(self.schedule[stage].widths)
        if self.is_ddp:  # its modules run, so their BatchNorms synchronise like the student's
            self.assistant = nn.SyncBatchNorm.convert_sync_batchnorm(self.assistant)
        self.assistant_slice = ChannelSlice(self.master, self.assistant)
        self.stage = stage

    def grow_to(self, stage: int) -> None:
        """Widen the assistant to `stage`, silencing the channels it gains so that its output does not change."""
        before = self.assistant_slice or self.student_slice
        self._enter_stage(stage)
        silence_added_channels(before, self.assistant_slice, self.optimizer)
        self.print_to_log_file(f"Assistant grows to widths {list(self.schedule[stage].widths)} (stage {stage + 1} of "
                               f"{len(self.schedule)}); student widths {self.student_widths}",
                               also_print_to_console=True)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        stage = stage_at(self.schedule, self.current_epoch)
        if stage != self.stage:
            self.grow_to(stage)
        self.sliced.train()

    # ---- training ----
    def train_step(self, batch: dict) -> dict:
        data, target, stored = self.inputs_and_targets(batch)
        kd, alpha = self.kd_terms["kd_loss"][0], self.kd_settings.alpha * self.kd_ramp

        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            # the assistant is the student grown wider: it sees the student's channels, the teacher all of them
            assistant_output, student_output = self.sliced(self.student_input(data), self.assistant_slice,
                                                           self.student_slice)
            teacher_output = self.teacher_output(data, stored, assistant_output)
            detached = [o.detach() for o in assistant_output] if isinstance(assistant_output, (list, tuple)) \
                else assistant_output.detach()
            parts = {"seg_loss": self.loss(student_output, target),
                     "kd_loss": kd(student_output, detached),
                     "assistant_seg_loss": self.loss(assistant_output, target),
                     "assistant_kd_loss": kd(assistant_output, teacher_output)}
            loss = parts["seg_loss"] + alpha * parts["kd_loss"] + parts["assistant_seg_loss"] \
                + alpha * parts["assistant_kd_loss"]
        width = np.mean(np.array(self.schedule[self.stage].widths) / np.array(self.student_widths))
        return self.finish_step(loss, parts, assistant_width=width)

    # ---- the student as an ordinary network for validation, checkpoints and prediction ----
    def on_validation_epoch_start(self):
        self.student_slice.copy_into_narrow()
        super().on_validation_epoch_start()

    def save_checkpoint(self, filename: str) -> None:
        self.student_slice.copy_into_narrow()
        super().save_checkpoint(filename)

    def kd_state(self) -> dict:
        return {"master_weights": self.master.state_dict(), "stage": self.stage,
                "schedule": [asdict(s) for s in self.schedule]}

    def load_kd_state(self, state: dict) -> None:
        self.master.load_state_dict(state["master_weights"])
        self.schedule = [GrowthStage(s["start_epoch"], tuple(s["widths"])) for s in state["schedule"]]
        if state["stage"] >= 0:
            self._enter_stage(state["stage"])
