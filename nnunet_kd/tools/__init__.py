"""Command-line tools around nnU-Net: the CLI, the demo, benchmarks, the KD study and its report; here, what the
command groups share (nnU-Net's folders, the environment of the commands they run)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nnunet_kd.core.settings import TRAINERS_FOLDER, KDConfigurationError


def command_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for nnU-Net's and this package's commands run as subprocesses."""
    env = dict(os.environ)
    env.update({
        # the commands live next to this Python, also when its environment is not activated
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "nnUNet_extTrainer": env.get("nnUNet_extTrainer") or str(TRAINERS_FOLDER),
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })
    return env


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name for a name or id, or one clear line saying where it was looked for."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        folders = ", ".join(f"{v}={os.environ.get(v) or '(unset)'}"
                            for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        raise KDConfigurationError(f"Dataset {dataset} not found in nnU-Net's folders ({folders}). Check the id, or "
                                   f"export the folders that hold it.") from e


def dataset_folder(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed.is_set():
        raise KDConfigurationError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    folder = Path(nnUNet_preprocessed.get()) / dataset_name(dataset)
    if not folder.is_dir():
        raise KDConfigurationError(f"{folder} does not exist. Run `nnUNetv2_plan_and_preprocess -d {dataset}` first.")
    return folder


def read_plans(dataset: str, plans_name: str) -> tuple[Path, dict]:
    """The preprocessed dataset folder and the plans `plans_name` in it."""
    folder = dataset_folder(dataset)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        raise KDConfigurationError(f"{plans_file} not found. Plan the dataset with these plans first, or pass -p with "
                                   f"one of {sorted(p.stem for p in folder.glob('*Plans*.json'))}.")
    return folder, json.loads(plans_file.read_text())


def default_teacher(dataset: str, configuration: str) -> str:
    from nnunetv2.paths import nnUNet_results

    if not nnUNet_results.is_set():
        raise KDConfigurationError("nnUNet_results is not set; export it or run `nnunet_kd demo` first.")
    folder = Path(nnUNet_results.get()) / dataset_name(dataset)
    for trainer in ("nnUNetTrainer", "nnUNetTrainer_demo"):
        candidate = folder / f"{trainer}__nnUNetPlans__{configuration}"
        if candidate.is_dir():
            return str(candidate)
    raise KDConfigurationError(f"No teacher in {folder}; pass --teacher MODEL_FOLDER.")


def use_demo_workspace_if_unset(workdir: str) -> None:
    """Benchmarks default to the demo's dataset: point nnU-Net at the demo's folders unless the user set them."""
    from nnunet_kd.tools.demo import workspace_environment

    if not os.environ.get("nnUNet_results") and Path(workdir).is_dir():
        os.environ.update(workspace_environment(Path(workdir).resolve()))
