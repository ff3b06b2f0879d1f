"""A student that sees fewer input channels (modalities) than its teacher: choosing them, and describing its model.

Channels are chosen by name, as dataset.json's `channel_names` spells them. The student's model folder describes only
its own channels (dataset.json and the plans' per-channel normalisation), so stock `nnUNetv2_predict` takes just
those files, numbered _0000, _0001, ... in the student's order.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nnunet_kd.core.settings import ENV_STUDENT_CHANNELS, KDConfigurationError
from nnunet_kd.deploy.cpu_inference import build_network_with_onednn


def channel_names(dataset_json: dict) -> list[str]:
    """The dataset's channel names in channel order (`channel_names`, or the legacy `modality`)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise KDConfigurationError("dataset.json has no channel_names; it is not an nnU-Net v2 dataset.json.")
    return [names[k] for k in sorted(names, key=int)]


@dataclass(frozen=True)
class ChannelSelection:
    """The student's channels: `names` in the student's order, `indices` into the dataset's (teacher's) channels."""

    names: tuple[str, ...]
    indices: tuple[int, ...]
    all_names: tuple[str, ...]

    def to_json(self) -> dict:
        return {"names": list(self.names), "indices": list(self.indices), "teacher_names": list(self.all_names)}


def select_channels(dataset_json: dict, spec: str, setting: str = ENV_STUDENT_CHANNELS) -> ChannelSelection:
    """Parse 'FLAIR,T1CE' against the dataset's channel names; a clear error for every way it can be wrong."""
    available = channel_names(dataset_json)
    listing = ", ".join(available)
    if len(set(available)) != len(available):
        raise KDConfigurationError(f"dataset.json channel_names has repeated names ({listing}), so channels cannot be "
                                   f"chosen by name. Give each channel a distinct name in dataset.json.")
    requested = [n.strip() for n in spec.split(",") if n.strip()]
    if not requested:
        raise KDConfigurationError(f"{setting} is empty: name the channels the student sees, comma-separated, from "
                                   f"this dataset's {listing} (e.g. {setting}={','.join(available[-2:])}).")
    unknown = [n for n in requested if n not in available]
    if unknown:
        hints = {n: a for n in unknown for a in available if a.lower() == n.lower()}
        hint = f" Names are case-sensitive: did you mean {', '.join(hints.values())}?" if hints else ""
        raise KDConfigurationError(f"{setting}={spec!r}: {', '.join(unknown)} not in dataset.json channel_names "
                                   f"({listing}).{hint}")
    repeated = sorted({n for n in requested if requested.count(n) > 1})
    if repeated:
        raise KDConfigurationError(f"{setting}={spec!r} names {', '.join(repeated)} more than once; name each "
                                   f"channel once.")
    if len(requested) == len(available):
        raise KDConfigurationError(f"{setting}={spec!r} selects every channel ({listing}): the student would see "
                                   f"what the teacher sees. Leave out the modalities the student must do without.")
    return ChannelSelection(tuple(requested), tuple(available.index(n) for n in requested), tuple(available))


def student_dataset_json(dataset_json: dict, selection: ChannelSelection) -> dict:
    """dataset.json for the student's model folder: only its channels, renumbered from 0 in its order."""
    student = copy.deepcopy(dataset_json)
    student.pop("modality", None)
    student["channel_names"] = {str(i): name for i, name in enumerate(selection.names)}
    return student


def student_plans(plans: dict, selection: ChannelSelection) -> dict:
    """Plans whose per-channel entries (intensity properties, normalisation schemes, masks) are the student's."""
    student = copy.deepcopy(plans)
    properties = plans["foreground_intensity_properties_per_channel"]
    student["foreground_intensity_properties_per_channel"] = {str(i): properties[str(c)]
                                                              for i, c in enumerate(selection.indices)}
    for name, configuration in student["configurations"].items():
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key not in configuration:
                continue  # inherited from another configuration, which is subset itself
            if len(configuration[key]) != len(selection.all_names):
                raise KDConfigurationError(f"Plans configuration {name!r} has {len(configuration[key])} {key} for "
                                           f"{len(selection.all_names)} channels; re-run nnUNetv2_plan_and_preprocess.")
            configuration[key] = [configuration[key][c] for c in selection.indices]
    return student


def _channel_files(folder: Path, file_ending: str) -> dict[str, dict[int, Path]]:
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match:
            cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    return cases


def _subset_files(images: Path, destination: Path, selection: ChannelSelection,
                  file_ending: str) -> list[tuple[Path, Path]]:
    """(source, destination) of every case's selected channel files, renumbered _0000... in the selection's order."""
    pairs = []
    for case, files in _channel_files(images, file_ending).items():
        missing = [selection.all_names[c] for c in selection.indices if c not in files]
        if missing:
            raise KDConfigurationError(f"{images}: case {case} has no {', '.join(missing)} file.")
        pairs += [(files[c], destination / f"{case}_{i:04d}{file_ending}") for i, c in enumerate(selection.indices)]
    return pairs


def subset_images(images: str | Path, destination: str | Path, dataset_json: dict, spec: str) -> Path:
    """The student's input files of a folder of full-channel images (hard links where the file system allows):
    what stock `nnUNetv2_predict` of a fewer-channel student reads. An existing complete folder is reused."""
    selection = select_channels(dataset_json, spec)
    destination = Path(destination)
    for src, dst in _subset_files(Path(images), destination, selection, dataset_json["file_ending"]):
        if dst.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return destination


def subset_raw_dataset(source: str | Path, destination: str | Path, spec: str) -> Path:
    """Copy a raw nnU-Net dataset keeping only the named channels, renumbered _0000... in the order given.

    It makes the "plain nnU-Net on the student's modalities" baseline, and input folders for a fewer-modality student.
    """
    source, destination = Path(source), Path(destination)
    dataset_json = json.loads((source / "dataset.json").read_text())
    selection = select_channels(dataset_json, spec, "--channels")
    if destination.exists():
        raise KDConfigurationError(f"{destination} exists; choose another dataset id or remove it first.")
    plan = [pair for images in ("imagesTr", "imagesTs") if (source / images).is_dir()
            for pair in _subset_files(source / images, destination / images, selection, dataset_json["file_ending"])]
    destination.mkdir(parents=True)
    for src, dst in plan:
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(src, dst)
    for labels in ("labelsTr", "labelsTs"):
        if (source / labels).is_dir():
            shutil.copytree(source / labels, destination / labels)
    subset = student_dataset_json(dataset_json, selection)
    subset["description"] = f"{source.name} with channels {', '.join(selection.names)} only"
    (destination / "dataset.json").write_text(json.dumps(subset, indent=2))
    return destination


class InputChannelCheck:
    """Forward pre-hook refusing inputs with another channel count than the network was built for."""

    def __init__(self, num_input_channels: int) -> None:
        self.num_input_channels = num_input_channels

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if args and args[0].ndim > 1 and args[0].shape[1] != self.num_input_channels:
            raise ValueError(
                f"This network takes {self.num_input_channels} input channels, got {args[0].shape[1]}. A student "
                f"trained on fewer modalities takes only the channels its model folder's dataset.json lists "
                f"(channel_names), numbered _0000... in that order; `nnunet_kd subset-channels` makes such a copy of "
                f"a dataset.")


def build_network_checking_channels(plans_manager, configuration_manager, num_input_channels: int,
                                    num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
    """build_network_with_onednn, whose forward names a wrong input channel count instead of a shape error."""
    network = build_network_with_onednn(plans_manager, configuration_manager, num_input_channels,
                                         num_output_channels, enable_deep_supervision)
    network.register_forward_pre_hook(InputChannelCheck(num_input_channels))
    return network


class SelectChannels(nn.Module):
    """Feeds the wrapped network only some input channels (nnU-Net's own final validation reads full-channel cases).

    `decoder` is the wrapped network's (through nnU-Net's DDP wrapper too), so nnU-Net can switch deep supervision
    through this one; under DDP nnU-Net reaches for that switch through `.module`, which is this wrapper itself.
    """

    def __init__(self, network: nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.network = network
        self.indices = list(indices)

    @property
    def module(self) -> nn.Module:
        return self

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.network, "module", self.network).decoder

    def forward(self, x):
        return self.network(x[:, self.indices])


def subset_preprocessing_difference(image_files: list[str], plans: dict, configuration: str, dataset_json: dict,
                                    selection: ChannelSelection) -> dict:
    """What nnU-Net's preprocessing does differently to the student's channels when it sees only them.

    The student trains on cases preprocessed with every channel but predicts from its own: nnU-Net crops to the
    bounding box of the voxels that are non-zero in *any* channel, and with `use_mask_for_norm` normalises inside
    that mask, so fewer channels can mean another crop or other normalised values. Returns the crop boxes, whether
    they agree, and (where the shapes agree) the largest difference of the student's normalised channels.
    """
    import numpy as np
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    def run(files, plans_json, dataset):
        manager = PlansManager(plans_json)
        config = manager.get_configuration(configuration)
        preprocessor = config.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case(files, None, manager, config, dataset)
        return data, properties["bbox_used_for_cropping"]

    full, full_box = run(image_files, plans, dataset_json)
    sub, sub_box = run([image_files[i] for i in selection.indices], student_plans(plans, selection),
                       student_dataset_json(dataset_json, selection))
    full = full[list(selection.indices)]
    same_shape = full.shape == sub.shape
    return {"crop_full": [list(map(int, b)) for b in full_box], "crop_subset": [list(map(int, b)) for b in sub_box],
            "same_crop": same_shape and [list(b) for b in full_box] == [list(b) for b in sub_box],
            "max_abs_difference": float(np.abs(full - sub).max()) if same_shape else None,
            "fraction_differing": float((np.abs(full - sub) > 1e-4).mean()) if same_shape else None}


class StudentChannelsMixin:
    """For an nnUNetTrainer whose network sees only some of the dataset's channels (`nnUNet_KD_student_channels`).

    nnU-Net's loader keeps reading the dataset's preprocessed cases with every channel (a teacher needs them all);
    the student's plans and dataset.json replace the dataset's before nnU-Net builds the network, so its model folder
    describes only the student's channels and stock `nnUNetv2_predict` takes just those files. `student_input` takes
    the student's channels from a full-channel batch; validation does the same. On `--c` or `--val` the model folder's
    dataset.json names the channels the checkpoint was built for, whatever the environment says now.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, *args, **kwargs):
        request = os.environ.get(ENV_STUDENT_CHANNELS) or None
        if request:
            select_channels(dataset_json, request)  # a wrong name fails before nnU-Net writes its log file
        super().__init__(plans, configuration, fold, dataset_json, *args, **kwargs)
        self.full_plans, self.full_dataset_json = plans, dataset_json
        self.channels: ChannelSelection | None = None
        self.channels_request: str | None = request

    @property
    def full_plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.full_plans)

    @property
    def full_configuration_manager(self):
        return self.full_plans_manager.get_configuration(self.configuration_name)

    @property
    def num_dataset_channels(self) -> int:
        return len(channel_names(self.full_dataset_json))

    @property
    def num_loader_channels(self) -> int:
        """Image channels of a training batch: the dataset's (and a cascade's previous-stage channels)."""
        skipped = self.num_dataset_channels - len(self.channels.indices) if self.channels is not None else 0
        return self.num_input_channels + skipped

    def initialize(self):
        if not self.was_initialized and self.channels_request:
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            self.channels = select_channels(self.full_dataset_json, self.channels_request)
            self.dataset_json = student_dataset_json(self.full_dataset_json, self.channels)
            self.plans_manager = PlansManager(student_plans(self.full_plans, self.channels))
            self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
        super().initialize()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        recorded = Path(self.output_folder_base) / "dataset.json"
        if not self.was_initialized and recorded.is_file():
            names = channel_names(json.loads(recorded.read_text()))
            request = ",".join(names) if names != channel_names(self.full_dataset_json) else None
            if request != self.channels_request:
                self.print_to_log_file(f"Continuing with the input channels this model was trained on ({recorded}): "
                                       f"{request or 'all'}; the environment asked for {self.channels_request or 'all'}"
                                       f".", also_print_to_console=True)
            self.channels_request = request
        super().load_checkpoint(filename_or_checkpoint)

    def get_training_transforms(self, *args, **kwargs):
        # the loader carries every channel, so the mask step of nnU-Net's augmentation follows the dataset's channels,
        # not the student's shorter use_mask_for_norm list (that masked T1/T2 for a FLAIR/T1CE student)
        if self.channels is not None:
            kwargs["use_mask_for_norm"] = self.full_configuration_manager.use_mask_for_norm
        return super().get_training_transforms(*args, **kwargs)

    def student_input(self, data):
        """The student's channels of a full-channel batch (a cascade's previous-stage channels follow them)."""
        if self.channels is None:
            return data
        import torch

        extra = data[:, self.num_dataset_channels:]
        student = data[:, list(self.channels.indices)]
        return torch.cat([student, extra], 1) if extra.shape[1] else student

    def train_step(self, batch: dict) -> dict:
        # nnU-Net's own step (a plain student); KD trainers take the channels in their own step, beside the teacher
        return super().train_step({**batch, "data": self.student_input(batch["data"])})

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step({**batch, "data": self.student_input(batch["data"])})

    def perform_actual_validation(self, save_probabilities: bool = False):
        # the validation cases are the preprocessed full-channel ones: feed the student its channels only
        if self.channels is None:
            return super().perform_actual_validation(save_probabilities)
        student = self.network
        self.network = SelectChannels(student, self.channels.indices)
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.network = student

    def channel_crop_problems(self, num_cases: int = 2) -> list[str]:
        """Where nnU-Net's preprocessing of the student's own files (at prediction) crops differently from the
        full-channel cases it trains on (`subset_preprocessing_difference`), on the first training cases; [] if the
        raw dataset is not at hand."""
        from nnunetv2.paths import nnUNet_raw

        if self.channels is None or not nnUNet_raw.is_set():
            return []
        images = Path(nnUNet_raw) / self.plans_manager.dataset_name / "imagesTr"
        ending = self.full_dataset_json["file_ending"]
        problems = []
        for case in self.do_split()[0][:num_cases]:
            files = [images / f"{case}_{c:04d}{ending}" for c in range(self.num_dataset_channels)]
            if not all(f.is_file() for f in files):
                return []
            difference = subset_preprocessing_difference([str(f) for f in files], self.full_plans,
                                                         self.configuration_name, self.full_dataset_json,
                                                         self.channels)
            if not difference["same_crop"]:
                problems.append(f"case {case}: the student's channels alone crop to {difference['crop_subset']}, all "
                                f"channels to {difference['crop_full']}")
        return problems

    def warn_about_channel_crops(self) -> None:
        for problem in self.channel_crop_problems():
            self.print_to_log_file(f"WARNING: at prediction the student's own files crop differently from the "
                                   f"full-channel cases it trains on ({problem}).", also_print_to_console=True)
