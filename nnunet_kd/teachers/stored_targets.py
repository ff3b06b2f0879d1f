"""Teacher outputs computed once and stored, so that a KD step costs about a plain step, whatever the teacher.

`write_teacher_targets` runs a teacher (one fold, or several averaged as an ensemble, with test-time mirroring by
default) over every preprocessed case with nnU-Net's own sliding-window prediction, on the preprocessed array (no
resampling), and stores per case, in float16 blosc2 like nnU-Net's preprocessed data:
- softmax (label) tasks: log-probabilities, which are the logits up to a per-voxel shift that every softmax loss and
  the class-centred logit matching ignore;
- sigmoid (region) tasks: the logits.
With `target_format="topk"` (softmax tasks) a case stores per voxel only the k most probable classes and the mass
outside them, and per case the sums of a tail profile (`nnunet_kd.teachers.compact_targets`): its size per voxel
does not grow with the number of classes.
By default the teacher runs as nnU-Net runs it (torch), and the targets are those of nnU-Net's own prediction to
the bit. On a CPU, `runtime="openvino"` exports the teacher's folds to ONNX (into a temporary folder, each graph
checked against torch by `nnunet_kd.deploy.export`) and runs them with OpenVINO, measured faster for the teachers
tried; the targets then differ from torch's by float rounding (BENCHMARKS.md, "A CT in seconds on a CPU").
A manifest records where the targets come from and which preprocessed voxels and labels they belong to. Large
datasets split the work as `nnUNetv2_predict` does (`num_parts`, `part_id`): each part keeps its own manifest, and
reading them checks that every part was written by the same teacher with the same settings.

Training reads them through `nnunet_kd.teachers.targets_loader`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_kd import __version__
from nnunet_kd.core.checkpoints import file_sha256
from nnunet_kd.core.settings import ENV_TEACHER_TARGETS, KDConfigurationError
from nnunet_kd.deploy.batched_prediction import load_predictor
from nnunet_kd.teachers.compact_targets import check_top_k, decode_top_k, encode_top_k, tail_profile_sums, tail_weights
from nnunet_kd.teachers.frozen import TeacherSpec, check_teacher_files, compatibility_problems, normalised_labels

TARGETS_FOLDER = "kd_targets"
MANIFEST = "manifest.json"
PART_MANIFESTS = "manifest_part*.json"
# the manifest's "format" per `target_format`
FORMATS = {"dense": "blosc2-float16", "topk": "blosc2-topk-float16"}
CASE_SUFFIX = ".b2nd"
INDICES_SUFFIX = ".indices.b2nd"  # top-k: the class indices beside the values in <case>.b2nd
TAIL_SUFFIX = ".tail_profile.npy"  # top-k: the case's tail profile sums, (K, K) float64


def case_files(folder: Path, identifier: str, manifest: dict) -> list[Path]:
    """A case's files: the stored values, and for top-k targets the class indices and the tail profile sums."""
    files = [Path(folder) / f"{identifier}{CASE_SUFFIX}"]
    if manifest["format"] == FORMATS["topk"]:
        files += [Path(folder) / f"{identifier}{INDICES_SUFFIX}", Path(folder) / f"{identifier}{TAIL_SUFFIX}"]
    return files


def case_arrays(folder: Path, identifier: str, manifest: dict) -> list[Path]:
    """A case's blosc2 arrays: the stored values, and for top-k targets the class indices."""
    return [path for path in case_files(folder, identifier, manifest) if path.name.endswith(CASE_SUFFIX)]


def save_tail_profile(sums: torch.Tensor, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.save(file, sums.double().numpy())
    os.replace(partial, path)


def targets_root(preprocessed_dataset_folder: str | Path) -> Path:
    return Path(preprocessed_dataset_folder) / TARGETS_FOLDER


def default_targets_name(spec: TeacherSpec, mirroring: bool, target_format: str = "dense", top_k: int = 4,
                         runtime: str = "torch") -> str:
    """`<teacher model folder>__f0-1-2-3-4`, with `__nomirror` when test-time mirroring is off, `__top4` for top-k
    targets and `__openvino` (the runtime) where the teacher did not run under torch."""
    folds = "-".join(str(f) for f in spec.folds)
    return (f"{Path(spec.model_folder).name}__f{folds}" + ("" if mirroring else "__nomirror")
            + (f"__top{top_k}" if target_format == "topk" else "") + ("" if runtime == "torch" else f"__{runtime}"))


def _write_json_atomically(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2, sort_keys=True))
    os.replace(partial, path)


def _identity(manifest: dict) -> dict:
    """What makes two target sets the same: everything but the per-case bookkeeping and the dates (as JSON has it:
    tuples are lists)."""
    return json.loads(json.dumps({k: v for k, v in manifest.items()
                                  if k not in ("cases", "created", "finished", "nnunet_kd_version")}))


# voxels per slab of the per-voxel work: a slab's float32 copies of a 117-class output stay under ~1 GB
SLAB_VOXELS = 2 ** 21


def _slabs(logits: torch.Tensor) -> list[torch.Tensor]:
    """(K, z, ...) split along z into slabs of about SLAB_VOXELS voxels."""
    return list(logits.split(max(1, SLAB_VOXELS // math.prod(logits.shape[2:])), 1))


def _stored_quantity(logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    return torch.log_softmax(logits.float(), 0) if softmax else logits.float()


def _store_case(logits: torch.Tensor, identifier: str, output: Path, manifest: dict, patch_size: Sequence[int],
                device: torch.device | str = "cpu") -> dict:
    """Write one case (the teacher's float32 output, on the CPU as nnU-Net returns it) in the manifest's format;
    returns its disk use and what the format loses against float32, in the stored quantity and in probabilities.

    The per-voxel work runs on `device` one slab at a time: a 117-class CT's float32 output is tens of GB, so neither
    the device nor the host should hold several copies of it at once.
    """
    device = torch.device(device)
    softmax = manifest["activation"] == "softmax"
    top_k = manifest.get("top_k") if manifest["format"] == FORMATS["topk"] else None
    paths = case_files(output, identifier, manifest)
    encoded, sums = [], None
    for slab in _slabs(logits):
        stored = _stored_quantity(slab.to(device), softmax)
        if top_k is None:
            encoded.append((stored.half().cpu(), None))
            continue
        indices, values = encode_top_k(stored, top_k)
        slab_sums = tail_profile_sums(stored, indices)
        sums = slab_sums if sums is None else sums + slab_sums
        encoded.append((values.cpu(), indices.cpu()))
    _save_case(torch.cat([values for values, _ in encoded], 1).numpy(), paths[0], patch_size)
    weights = None
    if top_k is not None:
        _save_case(torch.cat([indices for _, indices in encoded], 1).numpy(), paths[1], patch_size)
        save_tail_profile(sums.cpu(), paths[2])
        # decoded with the case's own profile: training divides the tail by the profile of every case together
        weights = tail_weights(sums.cpu()).to(device)
    max_error = max_probability_error = sum_probability_error = 0.0
    for slab, (values, indices) in zip(_slabs(logits), encoded):
        stored, values = _stored_quantity(slab.to(device), softmax), values.to(device)
        read = values.float() if indices is None else decode_top_k(indices.to(device)[None], values[None],
                                                                    stored.shape[0], weights=weights)[0]
        probability_error = ((stored.exp() - read.softmax(0)) if softmax
                             else (stored.sigmoid() - read.sigmoid())).abs()
        max_error = max(max_error, float((read - stored).abs().max()))
        max_probability_error = max(max_probability_error, float(probability_error.max()))
        sum_probability_error += float(probability_error.double().sum())
    return {"shape": list(logits.shape), "bytes": sum(p.stat().st_size for p in paths), "max_abs_error": max_error,
            "max_abs_probability_error": max_probability_error,
            "mean_abs_probability_error": sum_probability_error / logits.numel()}


def read_manifests(folder: Path) -> dict | None:
    """The manifest of a targets folder, merged over the parts that wrote it (None: nothing written yet).

    Refuses parts written by another teacher or with other settings: their targets cannot be mixed.
    """
    paths = sorted(folder.glob(MANIFEST)) + sorted(folder.glob(PART_MANIFESTS))
    if not paths:
        return None
    manifests = [json.loads(p.read_text()) for p in paths]
    merged = dict(manifests[0], cases={})
    for path, manifest in zip(paths, manifests):
        if _identity(manifest) != _identity(merged):
            differing = sorted(k for k, v in _identity(manifest).items() if _identity(merged).get(k) != v)
            raise KDConfigurationError(
                f"{path} and {paths[0]} were written by other teachers or with other settings (differing: "
                f"{differing}): one targets folder holds one teacher's targets. Write the parts again with the same "
                f"teacher and options, or into another --name.")
        merged["cases"].update(manifest["cases"])
    if any("finished" not in m for m in manifests):
        merged.pop("finished", None)
    return merged


def _save_case(array: np.ndarray, path: Path, patch_size: Sequence[int]) -> None:
    """float16 blosc2 with nnU-Net's chunking for this patch size, written under a temporary name first."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    blocks, chunks = comp_blosc2_params(array.shape, list(patch_size), bytes_per_pixel=array.itemsize)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 2}
    blosc2.asarray(np.ascontiguousarray(array), urlpath=str(partial), chunks=chunks, blocks=blocks, cparams=cparams,
                   mmap_mode="w+")
    os.replace(partial, path)


TEACHER_RUNTIMES = ("torch", "openvino", "onnxruntime")


def load_teacher_predictor(teacher: TeacherSpec, runtime: str = "torch", device: str = "cpu",
                           tile_batch: int | None = None, mirroring: bool = True, tile_step_size: float = 0.5):
    """The teacher's predictor: nnU-Net's network under torch on `device`, or, on the CPU, its folds exported to
    ONNX and compiled by `runtime` (the export is written to a temporary folder and gone once compiled)."""
    if runtime not in TEACHER_RUNTIMES:
        raise KDConfigurationError(f"Unknown runtime {runtime!r}; choose one of {', '.join(TEACHER_RUNTIMES)}.")
    if runtime == "torch":
        return load_predictor(teacher.model_folder, teacher.folds, device=device, tile_batch=tile_batch,
                              use_mirroring=mirroring, tile_step_size=tile_step_size,
                              checkpoint=teacher.checkpoint_name)
    if torch.device(device).type != "cpu":
        raise KDConfigurationError(f"--runtime {runtime} runs the teacher on the CPU: pass -device cpu, or keep "
                                   f"--runtime torch (the default) on the GPU.")
    from nnunet_kd.core.settings import ensure_ext_trainer
    from nnunet_kd.deploy.export import export_onnx

    ensure_ext_trainer()  # a student teacher's trainer class lives in this package's trainers folder
    with tempfile.TemporaryDirectory(prefix="nnunet_kd_teacher_export_") as folder:
        export_onnx(teacher.model_folder, folder, teacher.folds, teacher.checkpoint_name, force=True)
        return load_predictor(folder, teacher.folds, tile_batch=tile_batch, use_mirroring=mirroring,
                              tile_step_size=tile_step_size, runtime=runtime)


def write_teacher_targets(teacher: TeacherSpec, preprocessed_dataset_folder: str | Path, plans_name: str,
                          configuration: str, output: Path, mirroring: bool = True, tile_step_size: float = 0.5,
                          device: str = "cpu", force: bool = False, progress: bool = True,
                          target_format: str = "dense", top_k: int = 4, num_parts: int = 1,
                          part_id: int = 0, tile_batch: int | None = None, runtime: str = "torch") -> dict:
    """Store `teacher`'s outputs for every preprocessed case of `plans_name`/`configuration` in
    `preprocessed_dataset_folder` ($nnUNet_preprocessed/<dataset>); returns this part's manifest.

    `target_format`: "dense" (every class) or "topk" (the `top_k` most probable classes and the rest's mass; softmax
    tasks only). `num_parts`/`part_id`: this process does every `num_parts`-th case, starting at `part_id`.
    `tile_batch`: sliding-window tiles per network call (`nnunet_kd.deploy.batched_prediction`); `runtime`: see
    `load_teacher_predictor`.
    Re-running continues: cases already stored are kept. Targets of another teacher (or other settings) in `output`
    are refused unless `force`, which deletes them (every part's) first.
    """
    if target_format not in FORMATS:
        raise KDConfigurationError(f"Unknown target format {target_format!r}; choose one of {sorted(FORMATS)}.")
    if not 0 <= part_id < num_parts:
        raise KDConfigurationError(f"-part_id must be in 0..{num_parts - 1} for -num_parts {num_parts}, got "
                                   f"{part_id}.")
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tqdm import tqdm

    base = Path(preprocessed_dataset_folder)
    dataset_name = base.name
    check_teacher_files(teacher, dataset_name, configuration)
    plans_file = base / f"{plans_name}.json"
    if not plans_file.is_file():
        raise KDConfigurationError(f"Plans {plans_file} not found. Run nnUNetv2_plan_and_preprocess for "
                                   f"{dataset_name} first, or pass the plans the student trains with (-p).")
    plans = load_json(str(plans_file))
    plans_manager = PlansManager(plans)
    if configuration not in plans["configurations"]:
        raise KDConfigurationError(f"Configuration {configuration} is not in {plans_file} "
                                   f"(it has {sorted(plans['configurations'])}).")
    config = plans_manager.get_configuration(configuration)
    dataset_json = load_json(str(base / "dataset.json"))
    data_folder = base / config.data_identifier
    if not data_folder.is_dir():
        raise KDConfigurationError(f"Preprocessed data {data_folder} not found. Run `nnUNetv2_plan_and_preprocess -d "
                                   f"{dataset_name} -c {configuration} -p ...` for these plans first.")

    torch_device = torch.device(device)
    predictor = load_teacher_predictor(teacher, runtime, device, tile_batch, mirroring, tile_step_size)
    problems = compatibility_problems(predictor.plans_manager, predictor.configuration_manager,
                                      predictor.dataset_json, plans_manager, config, dataset_json)
    if problems:
        raise KDConfigurationError(f"The teacher {teacher.model_folder} cannot predict the preprocessed data of "
                                   f"{plans_name} {configuration}:\n  - " + "\n  - ".join(problems))
    softmax = not plans_manager.get_label_manager(dataset_json).has_regions
    if target_format == "topk":
        if not softmax:
            raise KDConfigurationError(
                "Top-k targets keep the most probable of mutually exclusive classes; this dataset trains regions "
                "(sigmoid outputs, each its own yes/no), so store them dense (--format dense).")
        try:
            check_top_k(top_k, len(dataset_json["labels"]))
        except ValueError as error:
            raise KDConfigurationError(str(error)) from None
    manifest = {
        "format": FORMATS[target_format], **({"top_k": top_k} if target_format == "topk" else {}),
        "stored": "log_softmax" if softmax else "logits", "activation": "softmax" if softmax else "sigmoid",
        "teacher": {**teacher.to_json(), "trainer": predictor.trainer_name,
                    "plans": predictor.plans_manager.plans_name,
                    "checkpoint_sha256": [file_sha256(p) for p in teacher.checkpoint_paths()],
                    "mirroring": mirroring, "mirror_axes": list(predictor.allowed_mirroring_axes or ()) if mirroring
                    else [], "tile_step_size": tile_step_size,
                    # recorded where it is not torch, so that torch targets written before it stay the same targets
                    **({} if runtime == "torch" else {"runtime": runtime})},
        "data": {"dataset": dataset_name, "plans_name": plans_name, "configuration": configuration,
                 "data_identifier": config.data_identifier, "labels": dataset_json["labels"],
                 "regions_class_order": dataset_json.get("regions_class_order"),
                 "plans": plans, "dataset_json": dataset_json},
        "nnunet_kd_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {},
    }
    output = Path(output)
    manifest_path = output / (MANIFEST if num_parts == 1 else f"manifest_part{part_id}of{num_parts}.json")
    try:
        existing = read_manifests(output)
    except KDConfigurationError:
        if not force:
            raise
        existing = None
    if existing is not None and _identity(existing) != _identity(manifest):
        if not force:
            differing = sorted(k for k, v in _identity(manifest).items() if _identity(existing).get(k) != v)
            raise KDConfigurationError(
                f"{output} holds targets of another teacher or other settings (differing: {differing}). Use "
                f"another --name, or --force to replace them.")
        existing = None
    if existing is None and output.is_dir() and force:
        for stale in [*output.glob(f"*{CASE_SUFFIX}"), *output.glob(f"*{TAIL_SUFFIX}"), *output.glob(MANIFEST),
                      *output.glob(PART_MANIFESTS)]:
            stale.unlink()
    dataset_class = infer_dataset_class(str(data_folder))
    identifiers = sorted(dataset_class.get_identifiers(str(data_folder)))[part_id::num_parts]
    if existing is not None:  # this part's cases that any earlier run (split or not) has stored
        manifest["created"] = existing["created"]
        manifest["cases"] = {i: existing["cases"][i] for i in identifiers if i in existing["cases"]}
    output.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(manifest_path, manifest)

    dataset = dataset_class(str(data_folder), identifiers)
    todo = [i for i in identifiers
            if not (i in manifest["cases"] and all(p.is_file() for p in case_files(output, i, manifest)))]
    for identifier in tqdm(todo, desc="teacher targets", disable=not progress or not todo):
        data = np.asarray(dataset.load_case(identifier)[0][:], dtype=np.float32)
        with torch.no_grad():
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float().cpu()
            manifest["cases"][identifier] = _store_case(logits, identifier, output, manifest, config.patch_size,
                                                        torch_device)
        _write_json_atomically(manifest_path, manifest)
    manifest["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_json_atomically(manifest_path, manifest)
    return manifest


def summarise(manifest: dict) -> dict:
    """Disk per case and in total, and the format's worst and mean loss of precision, over the stored cases."""
    cases = list(manifest["cases"].values())
    if not cases:
        return {"cases": 0}
    total = sum(c["bytes"] for c in cases)
    return {"cases": len(cases), "total_mib": total / 2 ** 20, "mean_case_mib": total / len(cases) / 2 ** 20,
            "float32_mib": sum(4 * int(np.prod(c["shape"])) for c in cases) / 2 ** 20,
            "max_abs_error": max(c["max_abs_error"] for c in cases),
            "max_abs_probability_error": max(c["max_abs_probability_error"] for c in cases),
            "mean_abs_probability_error": float(np.mean([c["mean_abs_probability_error"] for c in cases]))}


@dataclass(frozen=True)
class StoredTargets:
    """A folder written by `write_teacher_targets`, found by name or path, and what a trainer checks before using it."""

    folder: Path
    manifest: dict

    @classmethod
    def locate(cls, name_or_folder: str, preprocessed_dataset_folder: str | Path) -> StoredTargets:
        candidates = [Path(name_or_folder)] if os.sep in name_or_folder else []
        candidates.append(targets_root(preprocessed_dataset_folder) / name_or_folder)
        for folder in candidates:
            manifest = read_manifests(folder) if folder.is_dir() else None
            if manifest is not None:
                return cls(folder.resolve(), manifest)
        root = targets_root(preprocessed_dataset_folder)
        available = sorted({p.parent.name for pattern in (MANIFEST, PART_MANIFESTS)
                            for p in root.glob(f"*/{pattern}")})
        raise KDConfigurationError(
            f"{ENV_TEACHER_TARGETS}={name_or_folder!r}: no stored teacher targets there (looked in "
            f"{[str(c) for c in candidates]}; available: {available or 'none'}). Write them with `nnunet_kd "
            f"teacher-targets`, or unset {ENV_TEACHER_TARGETS} to run the teacher online.")

    def tail_weights(self, identifiers: Sequence[str] | None = None) -> torch.Tensor | None:
        """Top-k targets: how a voxel's tail divides among the classes outside its top k (one row per top class), from
        the tail profiles of `identifiers` (default: every stored case); None for dense targets."""
        if self.manifest["format"] != FORMATS["topk"]:
            return None
        cases = sorted(self.manifest["cases"]) if identifiers is None else identifiers
        return tail_weights(sum(torch.from_numpy(np.load(self.folder / f"{identifier}{TAIL_SUFFIX}"))
                                for identifier in cases))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(_identity(self.manifest), sort_keys=True).encode()).hexdigest()

    def record(self) -> dict:
        """What a run records about its targets (the per-case bookkeeping left out)."""
        return {"folder": str(self.folder), "manifest_sha256": self.digest(),
                "teacher": self.manifest["teacher"], "stored": self.manifest["stored"],
                "format": self.manifest["format"], "top_k": self.manifest.get("top_k"),
                "data": {k: v for k, v in self.manifest["data"].items() if k not in ("plans", "dataset_json")}}

    def problems(self, plans_manager, configuration_name: str, configuration_manager, dataset_json: dict,
                 identifiers: Sequence[str]) -> list[str]:
        """Every reason these targets do not belong to a student of these plans training on these cases."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        data = self.manifest["data"]
        problems = []
        if data["dataset"] != plans_manager.dataset_name:
            problems.append(f"they belong to dataset {data['dataset']}, the student trains on "
                            f"{plans_manager.dataset_name}")
        if data["configuration"] != configuration_name:
            problems.append(f"they were written for configuration {data['configuration']}, the student trains "
                            f"{configuration_name}")
        if data["data_identifier"] != configuration_manager.data_identifier:
            problems.append(f"they were written for the preprocessed data {data['data_identifier']}, the student "
                            f"reads {configuration_manager.data_identifier}")
        if normalised_labels(data["dataset_json"]) != normalised_labels(dataset_json):
            problems.append(f"their labels {data['labels']} differ from the student's {dataset_json['labels']}")
        if not problems:
            stored_plans = PlansManager(data["plans"])
            problems += compatibility_problems(stored_plans, stored_plans.get_configuration(data["configuration"]),
                                               data["dataset_json"], plans_manager, configuration_manager,
                                               dataset_json)
        missing = [i for i in identifiers if i not in self.manifest["cases"]
                   or not all(p.is_file() for p in case_files(self.folder, i, self.manifest))]
        if missing:
            problems.append(f"{len(missing)} of the student's {len(identifiers)} training cases have no targets "
                            f"(e.g. {missing[:3]}); re-run `nnunet_kd teacher-targets` (every part, if it was split "
                            f"with -num_parts), which continues where it stopped")
        return problems

    def changed_teacher_checkpoints(self) -> list[str]:
        """Teacher checkpoints that still exist but differ from the ones the targets were computed with."""
        teacher = self.manifest["teacher"]
        spec = TeacherSpec(teacher["model_folder"], tuple(teacher["folds"]), teacher["checkpoint_name"])
        return [str(path) for path, digest in zip(spec.checkpoint_paths(), teacher["checkpoint_sha256"])
                if path.is_file() and file_sha256(path) != digest]
