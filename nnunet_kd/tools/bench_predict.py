"""What a user waits for: whole prediction commands, timed side by side, and where their time goes.

Every model (a trained model folder, predicted with stock `nnUNetv2_predict`, or a folder written
by `nnunet_kd export`, predicted with `nnunet_kd predict-onnx`) runs as its own process on the same cases with the
same flags, models interleaved, each call repeated. Beside the whole call:
- start-up: a process that does what the command does before its first case (imports, nnU-Net's trainer search,
  loading the checkpoints or ONNX sessions) and nothing else, then exits as the command does;
- per case: (call - start-up) / cases, the part that grows with the data;
- the stages of one case, run one after the other in one process with nnU-Net's own functions: preprocessing
  (`run_case`), network (`predict_logits_from_preprocessed_data`: sliding window, mirroring), resampling and export
  (`export_prediction_from_logits`). The command overlaps preprocessing and export with the network in worker
  processes, so the stages add up to more than its per-case time.
With reference labels, every call's predictions are scored with nnU-Net's evaluation: the Dice cost of each flag.

A model can carry flags of its own, `MODEL::FLAGS`, e.g. `student_onnx::--runtime onnxruntime --tile-batch 1`, so that
one export appears under several runtimes and tile batches beside stock nnUNetv2_predict of the teacher, or
`teacher::-f 0 1 2 3 4`: that model's folds (the 5-fold ensemble beside a one-fold student), loaded by its start-up
and its stages as by its call.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.export import MANIFEST_FILE
from nnunet_kd.deploy.runtimes import default_runtime
from nnunet_kd.tools import command_environment
from nnunet_kd.tools.results import read_summary

DEFAULT_VARIANTS = ("", "--disable_tta")


def parse_variants(text: str) -> list[str]:
    """`--variants`: the flags of each variant, separated by ';', with 'defaults' for nnU-Net's (no flags)."""
    variants = [v.strip() for v in text.split(";")]
    return ["" if v == "defaults" else v for v in variants if v]


def is_export(model: str | Path) -> bool:
    return (Path(model) / MANIFEST_FILE).is_file()


def prediction_command(model: str | Path, images: str | Path, output: str | Path, flags: Sequence[str],
                       folds: Sequence[str] = ("0",)) -> tuple[list[str], dict[str, str]]:
    """The command a user runs, and the environment it needs: stock nnUNetv2_predict for a model folder
    (`$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`), predict-onnx for an export."""
    bin_dir, model = Path(sys.executable).parent, Path(model).resolve()
    if is_export(model):
        return [str(bin_dir / "nnunet_kd"), "predict-onnx", "-i", str(images), "-o", str(output), "-m", str(model),
                "-f", *folds, "--disable_progress_bar", *flags], {}
    if model.name.count("__") != 2:
        raise KDConfigurationError(f"{model} is not named <trainer>__<plans>__<configuration> as nnU-Net's model "
                                   f"folders are, nor an `nnunet_kd export` folder.")
    trainer, plans, configuration = model.name.split("__")
    return ([str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(output), "-d", model.parent.name,
             "-tr", trainer, "-p", plans, "-c", configuration, "-f", *folds, "-device", "cpu",
             "--disable_progress_bar", *flags], {"nnUNet_results": str(model.parent.parent)})


_STARTUP = """
import sys
from pathlib import Path
model, options, folds = sys.argv[1], sys.argv[2], sys.argv[3:]
if (Path(model) / {manifest!r}).is_file():
    import json
    from nnunet_kd.deploy.batched_prediction import load_onnx_predictor
    load_onnx_predictor(model, folds, **json.loads(options))
    import gc
    gc.freeze()  # and exit as the nnunet_kd executable does (nnunet_kd.tools.cli.console_main)
else:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(model, folds)
"""


def split_model_spec(spec: str) -> tuple[str, str]:
    """'student_onnx::--runtime onnxruntime' -> ('student_onnx', '--runtime onnxruntime')."""
    model, _, flags = str(spec).partition("::")
    return model, flags.strip()


def split_folds(model_flags: str, folds: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """A model's own `-f F [F ...]` out of its flags: ('-f 0 1 2 --disable_tta', ('0',)) -> (('0', '1', '2'),
    '--disable_tta'); without one, `folds`."""
    words = shlex.split(model_flags)
    if "-f" not in words:
        return tuple(folds), model_flags
    start = end = words.index("-f") + 1
    while end < len(words) and not words[end].startswith("-"):
        end += 1
    if end == start:
        raise KDConfigurationError(f"'{model_flags}': -f needs the model's folds, e.g. '-f 0 1 2 3 4'.")
    return tuple(words[start:end]), shlex.join(words[:start - 1] + words[end:])


def export_options(flags: Sequence[str]) -> dict:
    """The runtime and tile batch that predict-onnx flags ask for (absent: the predictor's defaults)."""
    options: dict = {}
    if "--runtime" in flags:
        options["runtime"] = flags[flags.index("--runtime") + 1]
    if "--tile-batch" in flags:
        options["tile_batch"] = int(flags[flags.index("--tile-batch") + 1])
    if "--precision" in flags:
        options["precision"] = flags[flags.index("--precision") + 1]
    return options


def startup_command(model: str | Path, folds: Sequence[str] = ("0",), flags: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-c", _STARTUP.format(manifest=MANIFEST_FILE), str(model),
            json.dumps(export_options(flags)), *folds]


def timed_process(command: Sequence[str], env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and its worker processes) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` exited {process.returncode}:\n{stderr[-3000:]}")
    # children of the child (nnU-Net's worker processes) are counted once they are reaped by it
    return wall, usage.ru_utime + usage.ru_stime


def _load(model: str | Path, folds: Sequence[str], use_mirroring: bool, step_size: float, flags: Sequence[str]):
    if is_export(model):
        from nnunet_kd.deploy.batched_prediction import load_onnx_predictor

        return load_onnx_predictor(model, folds, step_size, use_mirroring, allow_tqdm=False, **export_options(flags))
    import torch

    from nnunet_kd.tools.bench import load_predictor

    predictor = load_predictor(str(model), tuple(folds), torch.device("cpu"))
    predictor.use_mirroring, predictor.tile_step_size = use_mirroring, step_size
    return predictor


def _flag_value(flags: Sequence[str], name: str, default: float) -> float:
    return float(flags[flags.index(name) + 1]) if name in flags else default


def stage_seconds(model: str | Path, cases: Sequence[Sequence[str]], flags: Sequence[str],
                  folds: Sequence[str] = ("0",)) -> dict[str, float]:
    """Median seconds per case of preprocessing, network and resampling + export, one after the other."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    predictor = _load(model, folds, "--disable_tta" not in flags, _flag_value(flags, "-step_size", 0.5), flags)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    times: dict[str, list[float]] = {"preprocessing": [], "network": [], "export": []}
    with tempfile.TemporaryDirectory() as out:
        for i, files in enumerate(cases):
            start = time.perf_counter()
            data, _, properties = preprocessor.run_case(list(files), None, predictor.plans_manager,
                                                        predictor.configuration_manager, predictor.dataset_json)
            preprocessed = time.perf_counter()
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            predicted = time.perf_counter()
            export_prediction_from_logits(logits, properties, predictor.configuration_manager,
                                          predictor.plans_manager, predictor.dataset_json, f"{out}/case_{i}", False)
            exported = time.perf_counter()
            times["preprocessing"].append(preprocessed - start)
            times["network"].append(predicted - preprocessed)
            times["export"].append(exported - predicted)
    return {stage: statistics.median(values) for stage, values in times.items()}


def _mean_dice(predictions: Path, labels: Path, model: str | Path) -> float:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset_json = json.loads((Path(model) / "dataset.json").read_text())
    label_manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    classes = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    reader = determine_reader_writer_from_dataset_json(dataset_json, next(predictions.glob(
        f"*{dataset_json['file_ending']}")))()
    compute_metrics_on_folder(str(labels), str(predictions), str(predictions / "summary.json"), reader,
                              dataset_json["file_ending"], classes, None, num_processes=1)
    return read_summary(predictions / "summary.json", dataset_json["labels"]).foreground_mean


def bench_predict(models: Sequence[str | Path], images: str | Path, variants: Sequence[str] = DEFAULT_VARIANTS,
                  labels: str | Path | None = None, repeats: int = 3, folds: Sequence[str] = ("0",),
                  stages: bool = True) -> dict:
    """Whole prediction calls of every model under every flag variant, interleaved, `repeats` times each."""
    images = Path(images)
    specs = [split_model_spec(m) for m in models]
    file_ending = _file_ending(specs[0][0])
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    cases = create_lists_from_splitted_dataset_folder(str(images), file_ending)
    if not cases:
        raise KDConfigurationError(f"No images ending in {file_ending} in {images}.")
    env = command_environment()
    runs = [{"model": model, "model_flags": model_flags, "folds": split_folds(model_flags, folds)[0],
             "onnx": is_export(model), "flags": variant, "walls": [], "cpus": [], "startups": []}
            for variant in variants for model, model_flags in specs]
    for run in runs:
        if run["onnx"]:
            run["runtime"] = export_options(shlex.split(run["model_flags"])).get("runtime", default_runtime())
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for i, run in enumerate(runs):
                out = Path(tmp) / f"run_{i}"
                flags = _run_flags(run)
                command, extra_env = prediction_command(run["model"], images, out, flags, run["folds"])
                wall, cpu = timed_process(command, {**env, **extra_env})
                run["walls"].append(wall)
                run["cpus"].append(cpu)
                run["startups"].append(timed_process(startup_command(run["model"], run["folds"], flags), env)[0])
                if repeat == 0 and labels is not None:
                    run["mean_dice"] = _mean_dice(out, Path(labels), run["model"])
    for run in runs:
        run["call_seconds"] = statistics.median(run.pop("walls"))
        run["call_cpu_seconds"] = statistics.median(run.pop("cpus"))
        run["startup_seconds"] = statistics.median(run.pop("startups"))
        run["seconds_per_case"] = max(run["call_seconds"] - run["startup_seconds"], 0.0) / len(cases)
        if stages:
            run["stages"] = stage_seconds(run["model"], cases, _run_flags(run), run["folds"])
    reference = {run["flags"]: run for run in runs if (run["model"], run["model_flags"]) == specs[0]}
    for run in runs:
        first = reference[run["flags"]]
        run["call_speedup"] = first["call_seconds"] / run["call_seconds"]
        run["per_case_speedup"] = (first["seconds_per_case"] / run["seconds_per_case"]
                                   if run["seconds_per_case"] > 0 else float("nan"))
    shape = _image_shape(cases[0][0])
    return {"cases": len(cases), "image_shape": shape, "repeats": repeats, "cpu_count": os.cpu_count(),
            "runs": runs}


def _run_flags(run: dict) -> list[str]:
    return shlex.split(run["flags"]) + shlex.split(split_folds(run["model_flags"], run["folds"])[1])


def _file_ending(model: str | Path) -> str:
    path = Path(model) / "dataset.json"
    if not path.is_file():
        raise KDConfigurationError(f"{model} is neither a trained model folder nor an export (no dataset.json).")
    return json.loads(path.read_text())["file_ending"]


def _image_shape(path: str) -> list[int]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return list(reversed(reader.GetSize()))


def format_predict(result: dict) -> str:
    shape = "x".join(map(str, result["image_shape"]))
    lines = [f"whole prediction calls on the CPU ({result['cpu_count']} cores), {result['cases']} cases of {shape} "
             f"voxels (first case), median of {result['repeats']} interleaved runs; speed-ups relative to the first "
             f"model with the same flags; stages: one case at a time in one process",
             "",
             "| model | flags | mean Dice | call s | call CPU s | start-up s | s/case | speed-up (call) | "
             "speed-up (per case) | preprocessing s | network s | resampling + export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        name = Path(run["model"]).name + (f" ({run['runtime']})" if run["onnx"] else "") + (
            f" {run['model_flags']}" if run["model_flags"] else "")
        dice = f"{run['mean_dice']:.3f}" if "mean_dice" in run else "-"
        stages = run.get("stages") or {}
        stage_cells = " | ".join(f"{stages[s]:.2f}" if s in stages else "-"
                                 for s in ("preprocessing", "network", "export"))
        lines.append(f"| {name} | {run['flags'] or '(defaults)'} | {dice} | {run['call_seconds']:.1f} | "
                     f"{run['call_cpu_seconds']:.1f} | {run['startup_seconds']:.1f} | {run['seconds_per_case']:.2f} | "
                     f"{run['call_speedup']:.2f} | {run['per_case_speedup']:.2f} | {stage_cells} |")
    return "\n".join(lines)
