"""What every trainer of this package shares, whatever its method: the run's bookkeeping, written once.

- start: the seed (`nnUNet_KD_seed`, before nnU-Net builds the network, so a KD run and its no-KD twin start from the
  same weights), the training length from the environment, the method's settings, a warning for `nnUNet_KD_*`
  variables that mean nothing to the run;
- the run record (`kd_settings.json` next to the checkpoints) and, on `--c`, the recorded settings adopted before
  nnU-Net loads the checkpoint;
- extra state a method needs to resume exactly (a master network, a jointly trained teacher): one companion file per
  nnU-Net checkpoint, `<checkpoint>.kd_state.pth`, so nnU-Net's own checkpoint holds the student alone;
- nnU-Net's optimiser and update over whatever the method trains, and the per-epoch logging of the loss parts
  (`train_<part>`, also drawn in progress.png);
- DDP (`nnUNetv2_train ... -num_gpus N`): nnU-Net wraps the student; a module the method trains beside it (a joint
  teacher, a master network) gets the same wrapper (`ddp_wrapped`), and the logged loss parts are means over all ranks.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_kd import __version__
from nnunet_kd.core.checkpoints import load_checkpoint
from nnunet_kd.core.schedule import apply_schedule_from_environment, seed_from_environment
from nnunet_kd.core.settings import (
    ENV_TEACHER_TARGETS,
    SETTINGS_FILE,
    BaseKDSettings,
    KDConfigurationError,
    RunEnvironment,
    read_settings_file,
    write_settings_file,
)
from nnunet_kd.students.modalities import StudentChannelsMixin

KD_STATE_SUFFIX = ".kd_state.pth"


# ---- the pieces of nnUNetTrainer.train_step that every trainer here repeats around its own loss ----
def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """The batch's data and target (one tensor, or one per deep-supervision output) on `device`."""
    data = batch["data"].to(device, non_blocking=True)
    target = batch["target"]
    target = [t.to(device, non_blocking=True) for t in target] if isinstance(target, list) \
        else target.to(device, non_blocking=True)
    return data, target


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      grad_scaler: torch.amp.GradScaler | None, max_norm: float = 12.0) -> None:
    """nnU-Net's update: gradient scaling on CUDA, the gradient norm clipped at 12, over everything the optimiser
    trains (a student network, or also a second network or a master network the student is a slice of)."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, max_norm)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, max_norm)
        optimizer.step()


# ---- nnU-Net's per-epoch logger, extended with the loss parts of a distillation run ----
class KDLocalLogger(LocalLogger):
    """Logs extra per-epoch series and draws them in progress_kd.png, next to nnU-Net's own progress.png."""

    def __init__(self, extra_keys: Sequence[str], verbose: bool = False) -> None:
        super().__init__(verbose)
        self.extra_keys = list(extra_keys)
        for key in self.extra_keys:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict) -> None:
        missing = [k for k in self.extra_keys if k not in checkpoint]
        if missing:
            raise RuntimeError(f"This checkpoint has no logged {missing}; it was not written by this trainer. "
                               f"Resume with the trainer that wrote it.")
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder: str) -> None:
        # nnU-Net's progress.png as it is, and the loss parts in progress_kd.png beside it: stacking them into one
        # image cost ~6 s of PNG decoding and encoding per epoch on a CPU, against ~1 s for the two files
        super().plot_progress_png(output_folder)
        import matplotlib.pyplot as plt  # after nnU-Net's logger module chose the agg backend

        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        fig, ax = plt.subplots(1, 1, figsize=(15, 6))
        for key in self.extra_keys:
            ax.plot(range(epochs), self.my_fantastic_logging[key][:epochs], ls="-", label=key, linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss part")
        ax.legend(loc=(0, 1), ncol=len(self.extra_keys))
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress_kd.png"))
        plt.close(fig)


def kd_state_file(checkpoint_file: str) -> str:
    """`fold_0/checkpoint_latest.pth` -> `fold_0/checkpoint_latest.kd_state.pth`."""
    return checkpoint_file.removesuffix(".pth") + KD_STATE_SUFFIX


class nnUNetTrainerKDRun(StudentChannelsMixin, nnUNetTrainer):
    """The shared core; a method adds its settings (`kd_defaults`), its loss parts and its step. Every method may
    train a student on fewer channels than the dataset has (`StudentChannelsMixin`)."""

    kd_defaults: ClassVar[BaseKDSettings]
    # what train_step returns besides 'loss'; each is logged per epoch as 'train_<part>' and drawn in progress.png
    kd_loss_parts: ClassVar[tuple[str, ...]]
    # whether the method can learn from stored teacher outputs (nnUNet_KD_teacher_targets) instead of a teacher network
    reads_stored_targets: ClassVar[bool] = False
    # whether nnU-Net may torch.compile the student where it would (nnUNet_compile): not for a method whose step hooks
    # into the network or swaps weights in and out of it
    compiles: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = seed_from_environment()
        apply_schedule_from_environment(self)
        self.kd_settings = self.kd_defaults.with_environment()
        self.recorded_run: dict | None = None  # what kd_settings.json said when resuming
        self._missing_kd_state: str | None = None  # a companion file --c needs but did not find
        self.logger.local_logger = KDLocalLogger([f"train_{p}" for p in self.kd_loss_parts])

    # ---- start ----
    def check_run_environment(self) -> None:
        """Warn about stray `nnUNet_KD_*` variables; refuse a `--c` that could not continue the same run."""
        if RunEnvironment.read().teacher_targets and not self.reads_stored_targets:
            raise KDConfigurationError(f"{type(self).__name__} needs its teacher network during training, so it cannot "
                                       f"learn from stored teacher targets. Unset {ENV_TEACHER_TARGETS}.")
        ignored = self.kd_defaults.ignored_environment()
        if ignored:
            self.print_to_log_file(f"WARNING: {ignored} are set but {type(self).__name__} does not use them.")
        if self.current_epoch > 0 and self.recorded_run is None:
            raise KDConfigurationError(f"Cannot resume exactly: {SETTINGS_FILE} is missing from {self.output_folder}."
                                       f" Restore it, or start a new training without --c.")
        if self.current_epoch > 0 and self._missing_kd_state is not None:
            raise KDConfigurationError(f"Cannot resume exactly: {self._missing_kd_state} is missing or from another "
                                       f"epoch than the checkpoint. Restore it, or start a new training without --c.")

    def run_record(self, **sections) -> dict:
        """kd_settings.json: what every run records, plus the method's own sections."""
        return {"trainer": type(self).__name__, "nnunet_kd_version": __version__, "seed": self.seed,
                "schedule": {"num_epochs": self.num_epochs, "num_iterations_per_epoch": self.num_iterations_per_epoch,
                             "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch},
                "settings": self.kd_settings.to_json(), **sections}

    def save_run_record(self, record: dict) -> None:
        if self.local_rank == 0:
            write_settings_file(self.output_folder, record)

    # ---- resume ----
    def adopt_recorded_run(self, record: dict) -> None:
        """Continue with the settings the run started with, whatever the environment asks for now."""
        recorded = type(self.kd_defaults)(**record["settings"])
        if recorded != self.kd_settings:
            self.print_to_log_file(f"Resuming with the settings this training started with ({SETTINGS_FILE}): "
                                   f"{recorded}; the current environment asked for {self.kd_settings}.",
                                   also_print_to_console=True)
        self.kd_settings = recorded

    def kd_state(self) -> dict | None:
        """Extra state the method needs to resume exactly (None: nothing beyond nnU-Net's checkpoint)."""
        return None

    def load_kd_state(self, state: dict) -> None:
        raise NotImplementedError

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # the recorded settings first: they may shape what loading builds (a master network, the student's channels)
        record = read_settings_file(self.output_folder)
        if record is not None:
            self.recorded_run = record
            self.adopt_recorded_run(record)
        super().load_checkpoint(filename_or_checkpoint)
        if not isinstance(filename_or_checkpoint, str) or type(self).kd_state is nnUNetTrainerKDRun.kd_state:
            return
        path = kd_state_file(filename_or_checkpoint)
        state = load_checkpoint(path) if os.path.isfile(path) else None
        if state is None or state["current_epoch"] != self.current_epoch:  # nnU-Net set it from the checkpoint
            self._missing_kd_state = path  # fine for --val; check_run_environment refuses to train on
            return
        self.load_kd_state(state)

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        state = self.kd_state()
        if state is not None and self.local_rank == 0 and not self.disable_checkpointing:
            partial = f"{kd_state_file(filename)}.partial"
            torch.save({"current_epoch": self.current_epoch + 1, **state}, partial)
            os.replace(partial, kd_state_file(filename))

    def save_network_checkpoint(self, network: nn.Module, filename: str) -> None:
        """`network` alone in nnU-Net's checkpoint format, which nnUNetv2_predict loads (e.g. the model folder of a
        teacher trained beside the student)."""
        if self.local_rank == 0 and not self.disable_checkpointing:
            torch.save({"network_weights": network.state_dict(), "current_epoch": self.current_epoch + 1,
                        "init_args": self.my_init_kwargs, "trainer_name": type(self).__name__,
                        "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes}, filename)

    def on_train_end(self):
        super().on_train_end()
        # nnU-Net removes checkpoint_latest.pth when training ends; its companion goes with it
        latest = kd_state_file(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0 and os.path.isfile(latest):
            os.remove(latest)

    # ---- training ----
    def _do_i_compile(self) -> bool:
        return self.compiles and super()._do_i_compile()

    def autocast(self):
        """nnU-Net's mixed precision around a train step's forward passes: autocast on CUDA, nothing elsewhere."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def sgd_over(self, parameters) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
        """nnU-Net's optimiser and learning-rate schedule, over whatever the method trains."""
        optimizer = torch.optim.SGD(list(parameters), self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def ddp_wrapped(self, module: nn.Module) -> nn.Module:
        """`module`, trained beside the student, wrapped as nnU-Net wraps the student under DDP: BatchNorm synchronised
        and gradients averaged over the ranks in backward. Without DDP, or with nothing to train, the module itself.

        Call its forward through the wrapper and keep the module for checkpoints, like `self.network.module`.
        """
        if not self.is_ddp or not any(p.requires_grad for p in module.parameters()):
            return module  # DDP refuses a module without trainable parameters: there is nothing to synchronise
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        # nnU-Net puts rank r on cuda:r; on CPU (gloo) DDP takes no device_ids
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def finish_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], **logged) -> dict:
        """nnU-Net's update (scaled on CUDA, clipped) and what train_step returns: the loss and each part."""
        backward_and_step(loss, self.optimizer, self.grad_scaler)
        return {"loss": loss.detach().cpu().numpy(), **{k: v.detach().cpu().numpy() for k, v in parts.items()},
                **logged}

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
