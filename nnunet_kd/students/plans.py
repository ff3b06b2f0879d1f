"""Student plans: a copy of the teacher's nnU-Net plans with a narrower and/or shallower network.

The student keeps the teacher configuration's `data_identifier`, spacing, patch and normalisation, so it trains on the
teacher's preprocessed data (no second preprocessing run) and sees exactly the voxels the teacher saw.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

from nnunet_kd.core.checkpoints import num_parameters
from nnunet_kd.core.settings import KDConfigurationError

# keys of nnU-Net architecture kwargs that hold one entry per encoder stage
PER_STAGE_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")
BLOCK_KEYS = ("n_conv_per_stage", "n_blocks_per_stage")
# student architectures that take nnU-Net's PlainConvUNet arguments, by the name `--arch` knows them under
ARCHITECTURES = {
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "lcovnet": "nnunet_kd.architectures.lcovnet.LCOVNet",
}


def student_plans_name(base_plans_name: str, width: float, stages: int | None = None,
                       convs: int | None = None, arch: str | None = None) -> str:
    name = f"{base_plans_name}_KDStudent" + (f"_{arch}" if arch else "") + f"_w{width:g}"
    if stages is not None:
        name += f"_s{stages}"
    if convs is not None:
        name += f"_c{convs}"
    return name


def scale_architecture(arch_kwargs: dict, width: float, stages: int | None = None, convs: int | None = None,
                       min_features: int = 4) -> dict:
    """Architecture kwargs with features scaled by `width` (at least `min_features`), the deepest stages dropped down
    to `stages`, and `convs` convolutions (or residual blocks) per stage in encoder and decoder."""
    if not 0 < width <= 1:
        raise KDConfigurationError(f"--width must be in (0, 1], got {width}")
    kwargs = copy.deepcopy(arch_kwargs)
    n_stages = kwargs["n_stages"]
    if stages is not None:
        if not 2 <= stages <= n_stages:
            raise KDConfigurationError(f"--stages must be between 2 and the teacher's {n_stages}, got {stages}")
        for key in PER_STAGE_KEYS:
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][:stages]
        if isinstance(kwargs.get("n_conv_per_stage_decoder"), list):
            # the decoder list starts at the deepest stage, which is the one being dropped
            kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][n_stages - stages:]
        kwargs["n_stages"] = n_stages = stages
    if convs is not None:
        if convs < 1:
            raise KDConfigurationError(f"--convs must be >= 1, got {convs}")
        for key in BLOCK_KEYS:
            if key in kwargs:
                kwargs[key] = [convs] * n_stages
        if "n_conv_per_stage_decoder" in kwargs:
            kwargs["n_conv_per_stage_decoder"] = [convs] * (n_stages - 1)
    features = kwargs["features_per_stage"]
    features = [features] * n_stages if isinstance(features, int) else features
    kwargs["features_per_stage"] = [max(min_features, round(f * width)) for f in features]
    return kwargs


def make_student_plans(plans: dict, configurations: Sequence[str], width: float, stages: int | None = None,
                       convs: int | None = None, min_features: int = 4, name: str | None = None,
                       arch: str | None = None) -> dict:
    """New plans holding only `configurations`, each resolved (no inheritance) and scaled; with `arch`, the network
    class is replaced (e.g. 'lcovnet'), so that stock nnU-Net builds that architecture from the plans alone.

    Other configurations are left out on purpose: training one of them with the student plans would silently train a
    teacher-sized network under a student's name.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(copy.deepcopy(plans))
    student = copy.deepcopy(plans)
    if arch is not None and arch not in ARCHITECTURES:
        raise KDConfigurationError(f"Unknown --arch {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    student["plans_name"] = name or student_plans_name(plans["plans_name"], width, stages, convs, arch)
    student["configurations"] = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise KDConfigurationError(f"Configuration {configuration!r} is not in plans {plans['plans_name']} "
                                       f"(available: {list(plans['configurations'])}).")
        resolved = copy.deepcopy(manager.get_configuration(configuration).configuration)
        resolved.pop("inherits_from", None)
        if resolved.get("previous_stage") or resolved.get("next_stage"):
            raise KDConfigurationError(f"{configuration!r} is part of a cascade; student plans support single-stage "
                                       f"configurations (2d, 3d_fullres, 3d_lowres without cascade).")
        architecture = resolved["architecture"]
        if arch is not None:
            if "n_conv_per_stage" not in architecture["arch_kwargs"]:
                raise KDConfigurationError(f"--arch {arch} needs teacher plans of nnU-Net's PlainConvUNet kind "
                                           f"(n_conv_per_stage), e.g. nnUNetPlans; {plans['plans_name']} uses "
                                           f"{architecture['network_class_name']}.")
            architecture["network_class_name"] = ARCHITECTURES[arch]
        architecture["arch_kwargs"] = scale_architecture(architecture["arch_kwargs"], width, stages, convs,
                                                         min_features)
        student["configurations"][configuration] = resolved
    return student


def with_batch_size(plans: dict, configurations: Sequence[str], batch_size: int, name: str | None = None) -> dict:
    """A copy of `plans` whose `configurations` train with `batch_size`, named `<plans_name>_bs<N>` by default.

    nnU-Net sizes the batch for a GPU (up to 5 % of the dataset's voxels per step), which a CPU cannot afford; the
    variant keeps the `data_identifier`, so it trains on the data already preprocessed.
    """
    if batch_size < 1:
        raise KDConfigurationError(f"--batch-size {batch_size}: a batch holds at least one patch.")
    variant = copy.deepcopy(plans)
    variant["plans_name"] = name or f"{plans['plans_name']}_bs{batch_size}"
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise KDConfigurationError(f"Configuration {configuration!r} is not in plans {plans['plans_name']} "
                                       f"(available: {list(plans['configurations'])}).")
        variant["configurations"][configuration]["batch_size"] = batch_size
    return variant


def count_parameters(plans: dict, configuration: str, dataset_json: dict) -> int:
    """Parameters of the network nnU-Net builds for this configuration, as `nnUNetv2_predict` would."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import,
                                     determine_num_input_channels(manager, config, dataset_json),
                                     manager.get_label_manager(dataset_json).num_segmentation_heads,
                                     allow_init=False, deep_supervision=False)
    return num_parameters(network)


def write_plans(plans: dict, preprocessed_dataset_folder: str | Path, force: bool = False) -> tuple[Path, bool]:
    """Write `<plans_name>.json`; returns (path, written).

    An existing file of that name that agrees on everything the new plans hold gains their configurations (so
    `student-plans -c 2d` and `-c 3d_fullres` of one width share one file, as nnU-Net's own plans do); an identical
    file is left alone; one that differs in a configuration both hold, or outside the configurations, is replaced only
    with `force`.
    """
    path = Path(preprocessed_dataset_folder) / f"{plans['plans_name']}.json"
    plans = json.loads(json.dumps(plans))
    if path.is_file() and not force:
        existing = json.loads(path.read_text())
        merged = {**existing, "configurations": {**existing.get("configurations", {}), **plans["configurations"]}}
        conflicting = sorted(c for c in plans["configurations"]
                             if c in existing.get("configurations", {}) and existing["configurations"][c]
                             != plans["configurations"][c])
        others_differ = {k: v for k, v in existing.items() if k != "configurations"} != \
            {k: v for k, v in plans.items() if k != "configurations"}
        if merged == existing:
            return path, False
        if conflicting or others_differ:
            what = f"configuration(s) {conflicting}" if conflicting else "its dataset-wide entries"
            raise KDConfigurationError(f"{path} exists and differs from the plans asked for in {what}. Choose another "
                                       f"--name, or pass --force to replace it (trained models keep their own copy of "
                                       f"the plans in their results folder).")
        plans = merged
    path.write_text(json.dumps(plans, indent=4, sort_keys=False))
    return path, True
