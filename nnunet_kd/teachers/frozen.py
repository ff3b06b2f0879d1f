"""Finding, checking and running a trained nnU-Net model as a frozen distillation teacher.

The teacher is loaded through nnU-Net's own `nnUNetPredictor`, so any trained model folder works as a teacher:
other plans (ResEnc), other trainers, or an earlier KD student. It never becomes part of the student's trainer
network, so checkpoints hold the student alone.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_kd.core.checkpoints import num_parameters
from nnunet_kd.core.settings import (
    ENV_TEACHER,
    ENV_TEACHER_CHECKPOINT,
    ENV_TEACHER_FOLDS,
    KDConfigurationError,
    RunEnvironment,
)

DEFAULT_TEACHER_TRAINER = "nnUNetTrainer"
DEFAULT_TEACHER_PLANS = "nnUNetPlans"


@dataclass(frozen=True)
class TeacherSpec:
    model_folder: str
    folds: tuple[int | str, ...]
    checkpoint_name: str

    def checkpoint_paths(self) -> list[Path]:
        return [Path(self.model_folder) / f"fold_{f}" / self.checkpoint_name for f in self.folds]

    def to_json(self) -> dict:
        return asdict(self)


def resolve_teacher_spec(results_folder: str | None, dataset_name: str, configuration: str, fold: int | str,
                         environ: Mapping[str, str] = os.environ) -> TeacherSpec:
    """The teacher to use: by default the stock nnUNetTrainer/nnUNetPlans model of the same configuration and fold.

    `nnUNet_KD_teacher` takes a model folder (absolute path, or a `trainer__plans__configuration` name under
    `$nnUNet_results/<dataset>`), `nnUNet_KD_teacher_folds` one or several folds (several are averaged as an ensemble)
    and `nnUNet_KD_teacher_checkpoint` the checkpoint file name.
    """
    run = RunEnvironment.read(environ)
    folder = run.teacher or f"{DEFAULT_TEACHER_TRAINER}__{DEFAULT_TEACHER_PLANS}__{configuration}"
    if not os.path.isabs(folder):
        if results_folder is None:
            raise KDConfigurationError("nnUNet_results is not set, so the teacher model folder cannot be found. "
                                       f"Set nnUNet_results, or set {ENV_TEACHER} to an absolute model folder.")
        folder = os.path.join(results_folder, dataset_name, folder)
    folds = run.teacher_folds or (fold,)
    checkpoint = run.teacher_checkpoint or "checkpoint_final.pth"
    return TeacherSpec(os.path.abspath(folder), folds, checkpoint)


def check_teacher_files(spec: TeacherSpec, dataset_name: str, configuration: str) -> None:
    """Raise a KDConfigurationError naming what is missing and how to get it."""
    folder = Path(spec.model_folder)
    train_hint = (f"Train the teacher first (e.g. `nnUNetv2_train {dataset_name} {configuration} FOLD`), or point "
                  f"{ENV_TEACHER} / {ENV_TEACHER_FOLDS} / {ENV_TEACHER_CHECKPOINT} at an existing model.")
    if not folder.is_dir():
        raise KDConfigurationError(f"Teacher model folder not found: {folder}. {train_hint}")
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise KDConfigurationError(f"Teacher model folder {folder} has no {name}; it is not a trained nnU-Net "
                                       f"model folder. {train_hint}")
    available = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
    for fold, path in zip(spec.folds, spec.checkpoint_paths()):
        if not path.parent.is_dir():
            raise KDConfigurationError(f"Teacher fold_{fold} not found in {folder} (available: {available or 'none'}). "
                                       f"{train_hint}")
        if not path.is_file():
            present = sorted(p.name for p in path.parent.glob("*.pth"))
            raise KDConfigurationError(
                f"Teacher checkpoint {path} not found (fold_{fold} has: {present or 'no checkpoints'}). If the "
                f"teacher's training has not finished, finish it or set {ENV_TEACHER_CHECKPOINT}=checkpoint_best.pth. "
                f"{train_hint}")


def normalised_labels(dataset_json: dict) -> tuple:
    # regions may be stored as lists or tuples: compare their canonical form. With regions, the key order is the output
    # channel order, so it must match too; plain labels are identified by their values alone.
    labels = [(k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dataset_json["labels"].items()]
    has_regions = any(isinstance(v, tuple) for _, v in labels)
    return (labels if has_regions else sorted(labels, key=str),
            tuple(dataset_json.get("regions_class_order") or ()))


def compatibility_problems(teacher_plans, teacher_config, teacher_dataset_json: dict,
                           student_plans, student_config, student_dataset_json: dict,
                           check_channels: bool = True) -> list[str]:
    """Every reason why the teacher would not see the same preprocessed voxels, labels and channels as the student.

    Plans managers and configuration managers are nnU-Net's `PlansManager` / `ConfigurationManager`. The teacher may
    have any architecture and patch size; only what changes the voxels or the meaning of the outputs is compared.
    """
    problems = []
    if normalised_labels(teacher_dataset_json) != normalised_labels(student_dataset_json):
        problems.append(f"label/region definitions differ: teacher {teacher_dataset_json['labels']} "
                        f"(regions_class_order {teacher_dataset_json.get('regions_class_order')}), student "
                        f"{student_dataset_json['labels']} (regions_class_order "
                        f"{student_dataset_json.get('regions_class_order')}). Use a teacher trained on the same "
                        f"labels.")
    if check_channels and teacher_dataset_json["channel_names"] != student_dataset_json["channel_names"]:
        problems.append(f"input channels differ: teacher {teacher_dataset_json['channel_names']}, student "
                        f"{student_dataset_json['channel_names']}. Teacher and student must read the same channels in "
                        f"the same order.")
    if len(teacher_config.patch_size) != len(student_config.patch_size):
        problems.append(f"the teacher is a {len(teacher_config.patch_size)}D model and the student "
                        f"{len(student_config.patch_size)}D. Use a teacher of the same configuration type.")
        return problems  # spacing and the rest cannot be compared across dimensionalities
    if not np.allclose(teacher_config.spacing, student_config.spacing):
        problems.append(f"target spacing differs: teacher {list(teacher_config.spacing)}, student "
                        f"{list(student_config.spacing)}. Use a teacher of the same configuration (e.g. 3d_fullres "
                        f"for a 3d_fullres student) or student plans derived from the teacher's plans "
                        f"(`nnunet_kd student-plans`).")
    if list(teacher_plans.transpose_forward) != list(student_plans.transpose_forward):
        problems.append(f"transpose_forward differs: teacher {teacher_plans.transpose_forward}, student "
                        f"{student_plans.transpose_forward}.")
    if check_channels:
        if list(teacher_config.normalization_schemes) != list(student_config.normalization_schemes):
            problems.append(f"normalisation schemes differ: teacher {teacher_config.normalization_schemes}, student "
                            f"{student_config.normalization_schemes}.")
        if list(teacher_config.use_mask_for_norm) != list(student_config.use_mask_for_norm):
            problems.append(f"use_mask_for_norm differs: teacher {teacher_config.use_mask_for_norm}, student "
                            f"{student_config.use_mask_for_norm}.")
        uses_dataset_statistics = any("CT" in s for s in student_config.normalization_schemes)
        if uses_dataset_statistics and (teacher_plans.foreground_intensity_properties_per_channel
                                        != student_plans.foreground_intensity_properties_per_channel):
            problems.append("the CT intensity statistics in the plans differ, so CT normalisation gives different "
                            "voxels. Derive the student plans from the teacher's dataset fingerprint.")
    return problems


def required_divisor(config) -> np.ndarray:
    """Per axis, the number the input size must be a multiple of for this configuration's network."""
    return np.prod(np.array(config.pool_op_kernel_sizes, dtype=int), axis=0)


class FrozenTeacher(nn.Module):
    """One or several (fold ensemble) frozen networks whose logits are averaged.

    Returns the full-resolution logits, or with `deep_supervision` the list of the teacher's deep-supervision
    outputs, full resolution first (for multi-scale KD). Inputs are zero-padded at the far end of each axis to a
    multiple of the teacher's total stride when needed (the student patch may come from plans with fewer stages), and
    the logits are cropped back. Zero is the value nnU-Net pads normalised images with in sliding-window inference.
    """

    def __init__(self, networks: Sequence[nn.Module], divisor: Sequence[int], deep_supervision: bool = False) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.divisor = [int(d) for d in divisor]
        self.deep_supervision = deep_supervision
        for network in self.networks:
            decoder = getattr(network, "decoder", None)
            if deep_supervision and not hasattr(decoder, "deep_supervision"):
                raise KDConfigurationError(f"The teacher architecture {type(network).__name__} has no nnU-Net "
                                           f"deep-supervision switch (decoder.deep_supervision), which multi-scale "
                                           f"KD needs. Use a single-scale KD trainer for this teacher.")
            if decoder is not None and hasattr(decoder, "deep_supervision"):
                decoder.deep_supervision = deep_supervision
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        # frozen statistics (BatchNorm, dropout) whatever the caller asks for
        return super().train(False)

    def padding_for(self, spatial_shape: Sequence[int]) -> list[int]:
        return [(-s) % d for s, d in zip(spatial_shape, self.divisor)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = x.shape[2:]
        pad = self.padding_for(spatial)
        if any(pad):
            # F.pad lists pads from the last axis backwards
            x = F.pad(x, [p for amount in reversed(pad) for p in (0, amount)])
        summed = None
        for network in self.networks:
            out = network(x)
            out = [o.float() for o in out] if isinstance(out, (list, tuple)) else [out.float()]
            summed = out if summed is None else [a + b for a, b in zip(summed, out)]
        outputs = [o / len(self.networks) for o in summed]
        if any(pad):
            # each output keeps the share of the unpadded extent that corresponds to its own downsampling
            outputs = [o[(slice(None), slice(None)) + tuple(slice(0, -(-s * o.shape[2 + i] // x.shape[2 + i]))
                                                            for i, s in enumerate(spatial))] for o in outputs]
        return outputs if self.deep_supervision else outputs[0]


@dataclass
class LoadedTeacher:
    module: FrozenTeacher
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    trainer_name: str
    num_parameters: int


def _raise_for_unreadable_checkpoint(spec: TeacherSpec) -> None:
    """Name the teacher checkpoint torch cannot read (truncated copy, interrupted download), and the way out."""
    from nnunet_kd.core.checkpoints import load_checkpoint

    for path in spec.checkpoint_paths():
        try:
            load_checkpoint(path)
        except Exception as e:
            raise KDConfigurationError(
                f"The teacher checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): the "
                f"file is corrupt or truncated, e.g. by an interrupted copy. Copy it again from where the teacher was "
                f"trained, or set {ENV_TEACHER_CHECKPOINT} to another checkpoint of that folder (e.g. "
                f"checkpoint_best.pth).") from e


def load_teacher(spec: TeacherSpec, device: torch.device, deep_supervision: bool = False) -> LoadedTeacher:
    """Rebuild the teacher with nnU-Net's predictor (its own trainer class and plans), one network per fold."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(spec.model_folder, spec.folds, spec.checkpoint_name)
    except Exception as e:
        _raise_for_unreadable_checkpoint(spec)
        raise e
    # with nnUNet_compile set, the predictor wraps the network in torch.compile, whose state_dict keys carry an
    # `_orig_mod.` prefix that the checkpoints lack; the teacher is rebuilt from the plain module
    plain_network = getattr(predictor.network, "_orig_mod", predictor.network)
    networks = []
    for params in predictor.list_of_parameters:
        network = copy.deepcopy(plain_network)
        network.load_state_dict(params)
        networks.append(network)
    module = FrozenTeacher(networks, required_divisor(predictor.configuration_manager), deep_supervision).to(device)
    return LoadedTeacher(module, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json,
                         predictor.trainer_name, num_parameters(networks[0]))
