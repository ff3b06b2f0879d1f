"""Benchmarks: the cost of a KD training step, and student inference speed, size and memory.

Timings are taken side by side in one process (interleaved, after warm-up, medians), because only ratios measured
together mean something on a shared machine. CUDA timings synchronise and use nnU-Net's own autocast (train_step).
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_kd.core.checkpoints import num_parameters
from nnunet_kd.core.settings import KDConfigurationError, ensure_ext_trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextmanager
def _environment(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synthetic_batch(trainer, seed: int = 0, stored_targets: bool = False) -> dict:
    """A batch of the trainer's shape: random normalised images, random labels at every deep-supervision scale, and
    with `stored_targets` random stored teacher targets (all voxels valid) behind the image channels."""
    generator = torch.Generator().manual_seed(seed)
    patch = list(trainer.configuration_manager.patch_size)
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *patch, generator=generator)
    if stored_targets:
        heads = trainer.label_manager.num_segmentation_heads
        targets = torch.randn(trainer.batch_size, heads, *patch, generator=generator)
        data = torch.cat([data, targets, torch.ones(trainer.batch_size, 1, *patch)], 1)
    num_labels = max(2, len(trainer.label_manager.all_labels))
    seg = torch.randint(0, num_labels, (trainer.batch_size, 1, *patch), generator=generator).float()
    if trainer.label_manager.has_regions:
        seg = torch.cat([(seg > 0).float()] * trainer.label_manager.num_segmentation_heads, 1)
    scales = trainer._get_deep_supervision_scales()
    if scales is None:
        return {"data": data, "target": seg}
    targets = [seg if all(s == 1 for s in scale) else
               F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, scale)], mode="nearest")
               for scale in scales]
    return {"data": data, "target": targets}


STORED = " [stored targets]"


def _time_loader(trainer, warmup: int, repeats: int) -> float:
    """Median seconds for nnU-Net's training loader to produce one batch, in this process (no worker processes)."""
    with _environment(nnUNet_n_proc_DA="0"):
        loader, _ = trainer.get_dataloaders()
    times = []
    for round_ in range(warmup + repeats):
        start = time.perf_counter()
        next(loader)
        if round_ >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(dataset: str, configuration: str, plans: str, trainers: Sequence[str], teacher_folder: str,
               device: str = "cpu", warmup: int = 2, repeats: int = 5, fold: int = 0,
               teacher_folds: Sequence[int | str] | None = None, teacher_targets: str | None = None,
               loader: bool = False) -> dict:
    """Time train_step of each trainer on one batch, interleaved, plus the teacher's forward pass alone.

    The first trainer should be the plain student (e.g. nnUNetTrainer with the student plans): ratios are relative to
    it, and the bound `(student step + teacher forward) / student step` is what a KD step would cost if the teacher
    cost nothing beyond its forward pass. `teacher_folds` makes the online teacher an ensemble. With
    `teacher_targets` (a name or folder, as nnUNet_KD_teacher_targets) every KD trainer is also timed learning from
    those stored targets, and `loader` times nnU-Net's training data loader per batch too (with and without stored
    targets, in this process), since without a teacher network the data pipeline is what a step waits for.
    """
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_kd.core.output_space import nnUNetTrainerKD
    from nnunet_kd.teachers.frozen import TeacherSpec

    torch_device = torch.device(device)
    folds = tuple(f if f == "all" else int(f) for f in teacher_folds) if teacher_folds else (fold,)
    teacher_spec = TeacherSpec(os.path.abspath(teacher_folder), folds, "checkpoint_final.pth")
    loader = loader or teacher_targets is not None
    # nnU-Net creates each trainer's output folder and log file under nnUNet_results: a scratch folder keeps the
    # user's results untouched
    with tempfile.TemporaryDirectory() as scratch, _environment(nnUNet_results=scratch):
        def prepared(name: str, stored: bool):
            trainer = get_trainer_from_args(dataset, configuration, fold, name, plans, device=torch_device)
            trainer.initialize()
            if isinstance(trainer, nnUNetTrainerKD):
                trainer.prepare_distillation(**({"targets": teacher_targets} if stored else {"teacher": teacher_spec}))
            if hasattr(trainer, "grow_to"):
                trainer.grow_to(len(trainer.schedule) - 1)  # a growing assistant costs most at its widest
            trainer.network.train()
            return trainer

        instances = {}
        for name in trainers:
            instances[name] = prepared(name, stored=False)
            if teacher_targets is not None and isinstance(instances[name], nnUNetTrainerKD):
                instances[name + STORED] = prepared(name, stored=True)
        teacher = next((t.teacher for t in instances.values() if isinstance(t, nnUNetTrainerKD)
                        and t.teacher is not None), None)
        if teacher is None:
            raise KDConfigurationError("bench step needs at least one KD trainer, to load the teacher.")
        first = next(iter(instances.values()))
        batches = {False: synthetic_batch(first), True: synthetic_batch(first, stored_targets=True)}
        teacher_input = batches[False]["data"].to(torch_device)

        def teacher_forward():
            with torch.autocast(device, enabled=True) if device == "cuda" else _nullcontext():
                teacher(teacher_input)

        times: dict[str, list[float]] = {name: [] for name in instances}
        teacher_times: list[float] = []
        for round_ in range(warmup + repeats):
            for name, trainer in instances.items():
                batch = batches[name.endswith(STORED)]
                elapsed = _timed(lambda trainer=trainer, batch=batch: trainer.train_step(batch), torch_device)
                if round_ >= warmup:
                    times[name].append(elapsed)
            elapsed = _timed(teacher_forward, torch_device)
            if round_ >= warmup:
                teacher_times.append(elapsed)
        loader_s = {}
        if loader:
            loader_s["plain"] = _time_loader(first, warmup, repeats)
            stored_trainer = next((t for n, t in instances.items() if n.endswith(STORED)), None)
            if stored_trainer is not None:
                loader_s["stored targets"] = _time_loader(stored_trainer, warmup, repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[trainers[0]]
    teacher_forward_s = statistics.median(teacher_times)
    rows = []
    for name in instances:
        row = {"trainer": name, "step_s": medians[name], "ratio": medians[name] / base}
        if loader_s:
            load = loader_s["stored targets" if name.endswith(STORED) else "plain"]
            row.update(load_s=load, load_and_step_ratio=(load + medians[name]) / (loader_s["plain"] + base))
        rows.append(row)
    return {
        "device": device, "dataset": dataset, "configuration": configuration, "plans": plans,
        "batch_size": first.batch_size, "patch_size": list(first.configuration_manager.patch_size),
        "warmup": warmup, "repeats": repeats, "teacher": os.path.abspath(teacher_folder), "teacher_folds": list(folds),
        "teacher_targets": teacher_targets, "teacher_forward_s": teacher_forward_s,
        "bound_ratio": (base + teacher_forward_s) / base, "loader_s": loader_s, "trainers": rows,
    }


@contextmanager
def _nullcontext():
    yield


def format_step(result: dict) -> str:
    loader = bool(result.get("loader_s"))
    lines = [f"train step, {result['device']}, batch {result['batch_size']} x {result['patch_size']}, "
             f"median of {result['repeats']} after {result['warmup']} warm-up (interleaved); teacher folds "
             f"{result['teacher_folds']}" + (f"; stored targets {result['teacher_targets']}"
                                              if result.get("teacher_targets") else ""),
             f"{'trainer':<56}{'s/step':>10}{'ratio':>8}" + (f"{'load s':>10}{'load+step ratio':>17}" if loader
                                                             else "")]
    for row in result["trainers"]:
        line = f"{row['trainer']:<56}{row['step_s']:>10.4f}{row['ratio']:>8.3f}"
        if loader:
            line += f"{row['load_s']:>10.4f}{row['load_and_step_ratio']:>17.3f}"
        lines.append(line)
    lines.append(f"teacher forward alone: {result['teacher_forward_s']:.4f} s; bound (student step + teacher forward) "
                 f"/ student step = {result['bound_ratio']:.3f}")
    if loader:
        lines.append("load s: nnU-Net's training loader, one batch in this process (no augmentation workers); "
                     "load+step ratio: (load + step) / (plain load + plain step)")
    return "\n".join(lines)


def _cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - start) / 2 ** 20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def sampled_peak_rss_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory above the current level while `fn` runs, sampled every millisecond."""
    start, peak, running = _rss_mib(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        running[0] = False
        thread.join()
    return max(peak[0], _rss_mib()) - start


def cpu_peak_mib(model_folder: str, folds: Sequence[int | str], case: torch.Tensor) -> float:
    """Peak resident memory a case's prediction adds on the CPU, measured in a fresh process (in a shared one, memory
    freed by the previous model hides the next one's peak)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(case, os.path.join(tmp, "case.pt"))
        script = ("import torch; from nnunet_kd.tools.bench import load_predictor, sampled_peak_rss_mib;"
                  f"p = load_predictor({model_folder!r}, {tuple(folds)!r}, torch.device('cpu'));"
                  f"c = torch.load({os.path.join(tmp, 'case.pt')!r});"
                  "p.predict_logits_from_preprocessed_data(c);"  # warm-up: one-off allocations are not the peak
                  "print(sampled_peak_rss_mib(lambda: p.predict_logits_from_preprocessed_data(c)))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def _onednn_convolution_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def flops_per_patch(network: torch.nn.Module, num_input_channels: int, patch_size: Sequence[int]) -> int:
    """FLOPs of one forward pass on one patch, counted by torch's own FlopCounterMode (taught the oneDNN
    convolution that nnunet_kd's students use for CPU inference, which it does not know)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.mkldnn_convolution: _onednn_convolution_flops})
    x = torch.zeros(1, num_input_channels, *patch_size, device=next(network.parameters()).device)
    with counter, torch.no_grad():
        network(x)
    return int(counter.get_total_flops())


def load_predictor(model_folder: str, folds, device: torch.device, checkpoint: str = "checkpoint_final.pth"):
    """Stock nnUNetPredictor for a trained model folder, without its trainer-search chatter on stdout."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_ext_trainer()
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    predictor.network.to(device).eval()
    return predictor


def network_costs(predictors: Sequence, cases: Sequence[torch.Tensor], device: torch.device,
                  warmup: int = 1, channels: Sequence[Sequence[int] | None] | None = None) -> list[dict]:
    """Parameters, FLOPs per patch and median network seconds per case (stock sliding window and mirroring on
    preprocessed cases) of each predictor, timed side by side: interleaved per case, after warm-up. `channels`: per
    predictor, the channels of the (full-channel) cases it reads (None: all), for students on fewer channels."""
    channels = list(channels) if channels is not None else [None] * len(predictors)
    inputs = [[case if picked is None else case[list(picked)] for case in cases] for picked in channels]
    rows = []
    for predictor in predictors:
        patch = list(predictor.configuration_manager.patch_size)
        rows.append({"trainer": predictor.trainer_name, "plans": predictor.plans_manager.plans_name,
                     "parameters": num_parameters(predictor.network),
                     "flops_per_patch": flops_per_patch(predictor.network, len(predictor.dataset_json["channel_names"]),
                                                        patch),
                     "patch_size": patch, "times": []})
    for _ in range(warmup if cases else 0):
        for predictor, own in zip(predictors, inputs):
            predictor.predict_logits_from_preprocessed_data(own[0])
    for index in range(len(cases)):
        for row, predictor, own in zip(rows, predictors, inputs):
            row["times"].append(_timed(lambda p=predictor, c=own[index]: p.predict_logits_from_preprocessed_data(c),
                                       device))
    for row in rows:
        times = row.pop("times")
        row["seconds_per_case"] = statistics.median(times) if times else None
    return rows


def bench_infer(model_folders: Sequence[str], images: Sequence[Sequence[str]], device: str = "cpu",
                folds: Sequence[int | str] = (0,), warmup: int = 1, memory: bool = True) -> dict:
    """Stock nnUNetPredictor on the same cases for every model, interleaved per case; network time only
    (sliding window + mirroring at nnU-Net's defaults), preprocessing done once beforehand."""
    torch_device = torch.device(device)
    predictors = [load_predictor(folder, tuple(folds), torch_device) for folder in model_folders]
    first = predictors[0]
    preprocessor = first.configuration_manager.preprocessor_class(verbose=False)
    cases = []
    for files in images:
        data, _, _ = preprocessor.run_case(list(files), None, first.plans_manager, first.configuration_manager,
                                           first.dataset_json)
        cases.append(torch.from_numpy(data))
    rows = network_costs(predictors, cases, torch_device, warmup)
    for folder, row, predictor in zip(model_folders, rows, predictors):
        row["model"] = folder
        if not memory:
            row["peak_memory_mib"] = None
        elif torch_device.type == "cuda":
            row["peak_memory_mib"] = _cuda_peak_mib(lambda p=predictor: p.predict_logits_from_preprocessed_data(
                cases[0]), torch_device)
        else:
            row["peak_memory_mib"] = cpu_peak_mib(folder, folds, cases[0])
    for row in rows:
        row["speed_ratio"] = rows[0]["seconds_per_case"] / row["seconds_per_case"]
    return {"device": device, "cases": len(cases), "models": rows}


def format_infer(result: dict) -> str:
    lines = [f"inference, {result['device']}, {result['cases']} cases, median network seconds per case "
             f"(sliding window + mirroring), models interleaved",
             f"{'model':<60}{'params':>12}{'GFLOPs/patch':>14}{'s/case':>9}{'speed-up':>9}{'peak MiB':>10}"]
    for row in result["models"]:
        name = Path(row["model"]).name
        lines.append(f"{name:<60}{row['parameters']:>12,}{row['flops_per_patch'] / 1e9:>14.2f}"
                     f"{row['seconds_per_case']:>9.3f}{row['speed_ratio']:>9.2f}{row['peak_memory_mib']:>10.0f}")
    return "\n".join(lines)


def validation_cases(model_folder: Path, fold: int | str, predictor, limit: int) -> list[torch.Tensor]:
    """Up to `limit` preprocessed validation cases of the model's fold, as the final validation saw them."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if limit <= 0 or not nnUNet_preprocessed.is_set():
        return []
    validation = Path(model_folder) / f"fold_{fold}" / "validation"
    keys = sorted(p.name.removesuffix(predictor.dataset_json["file_ending"]) for p in validation.iterdir()
                  if p.name.endswith(predictor.dataset_json["file_ending"]))[:limit]
    folder = Path(nnUNet_preprocessed.get()) / predictor.plans_manager.dataset_name / \
        predictor.configuration_manager.data_identifier
    if not keys or not folder.is_dir():
        return []
    dataset = infer_dataset_class(str(folder))(str(folder), keys)
    return [torch.from_numpy(np.asarray(dataset.load_case(k)[0][:])) for k in keys]
