"""Which runtime and how many tiles per call: the network stage of prediction, measured per runtime and tile batch.

For one model (its trained model folder, and optionally its `nnunet_kd export`), every case is preprocessed once with
nnU-Net's preprocessor, then `predict_logits_from_preprocessed_data` (sliding window, Gaussian weighting, mirroring
if asked) runs under every runtime and tile batch, the settings interleaved per case after a warm-up call each.
The reference ("nnU-Net") is nnU-Net's own predictor and tile-by-tile loop on the network as nnUNetv2_predict builds
it; "torch" is this package's predictor (oneDNN convolutions on the CPU), "torch-stock" the same with PyTorch's own
convolution choice, "openvino" and "onnxruntime" run the export. Every setting is compared with the reference:
seconds, largest probability difference and the share of voxels whose class differs.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.batched_prediction import load_predictor
from nnunet_kd.deploy.cpu_inference import use_stock_convolutions

REFERENCE = ("nnU-Net", 1)


def _predictors(model_folder: Path, export_folder: Path | None, runtimes: Sequence[str], folds: Sequence[str]) -> dict:
    from nnunet_kd.tools.bench import load_predictor as load_stock_predictor

    # nnU-Net's predictor and network exactly as nnUNetv2_predict builds them: the reference
    predictors = {"nnU-Net": load_stock_predictor(str(model_folder), tuple(folds), torch.device("cpu"))}
    for runtime in runtimes:
        if runtime in ("torch", "torch-stock"):
            predictor = load_predictor(model_folder, folds)
            if runtime == "torch-stock":  # PyTorch's own convolution choice instead of oneDNN for every batch size
                use_stock_convolutions(predictor.network)
        elif export_folder is None:
            raise KDConfigurationError(f"Runtime {runtime} runs an export: pass --export (`nnunet_kd export`).")
        else:
            predictor = load_predictor(export_folder, folds, runtime=runtime)
        predictors[runtime] = predictor
    return predictors


def bench_runtimes(model_folder: str | Path, images: str | Path, export_folder: str | Path | None = None,
                   runtimes: Sequence[str] = ("torch", "openvino", "onnxruntime"),
                   tile_batches: Sequence[int] = (1, 2, 4, 8), cases: int = 2, mirroring: bool = False,
                   folds: Sequence[str] = ("0",)) -> dict:
    """Network seconds per case of every (runtime, tile batch), interleaved per case, with the difference of its
    output from nnU-Net's tile-by-tile torch loop."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    model_folder = Path(model_folder)
    predictors = _predictors(model_folder, Path(export_folder) if export_folder else None, runtimes, folds)
    reference_predictor = predictors["nnU-Net"]
    file_ending = reference_predictor.dataset_json["file_ending"]
    files = create_lists_from_splitted_dataset_folder(str(images), file_ending)[:cases]
    if not files:
        raise KDConfigurationError(f"No images ending in {file_ending} in {images}.")
    preprocessor = reference_predictor.configuration_manager.preprocessor_class(verbose=False)
    data = [torch.from_numpy(preprocessor.run_case(
        f, None, reference_predictor.plans_manager, reference_predictor.configuration_manager,
        reference_predictor.dataset_json)[0]) for f in files]
    settings = [REFERENCE] + [(r, b) for r in runtimes for b in tile_batches]
    for predictor in predictors.values():
        predictor.use_mirroring = mirroring

    def run(setting, case):
        predictor = predictors[setting[0]]
        if setting != REFERENCE:
            predictor.tile_batch = setting[1]
        start = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(case).float()
        return time.perf_counter() - start, logits

    seconds: dict = {s: [] for s in settings}
    worst: dict = {s: (0.0, 0.0) for s in settings}
    # warm-up: runtimes plan their kernels for each new batch shape on first use. A corner of the first case that
    # holds at least the largest tile batch costs less than the whole case
    extent = [2 * p for p in reference_predictor.configuration_manager.patch_size]
    if len(extent) < data[0].ndim - 1:  # 2d: every slice is a tile (or more)
        extent = [max(tile_batches), *extent]
    corner = data[0][(slice(None), *[slice(0, e) for e in extent])]
    for s in settings:
        run(s, corner)
    for case in data:
        reference = None
        for s in settings:
            elapsed, logits = run(s, case)
            seconds[s].append(elapsed)
            probabilities = reference_predictor.label_manager.apply_inference_nonlin(logits)
            if reference is None:
                reference = probabilities
            difference = float((probabilities - reference).abs().max())
            differing = float((probabilities.argmax(0) != reference.argmax(0)).float().mean())
            worst[s] = (max(worst[s][0], difference), max(worst[s][1], differing))
    base = statistics.median(seconds[REFERENCE])
    rows = [{"runtime": r, "tile_batch": b, "seconds_per_case": statistics.median(seconds[(r, b)]),
             "speedup": base / statistics.median(seconds[(r, b)]), "max_probability_difference": worst[(r, b)][0],
             "voxels_differing": worst[(r, b)][1]} for r, b in settings]
    return {"model": str(model_folder), "export": str(export_folder) if export_folder else None,
            "cases": len(data), "image_shape": list(data[0].shape[1:]), "mirroring": mirroring,
            "threads": torch.get_num_threads(), "rows": rows}


def format_runtimes(result: dict) -> str:
    shape = "x".join(map(str, result["image_shape"]))
    lines = [f"network stage of prediction ({Path(result['model']).name}), {result['cases']} cases of {shape} "
             f"preprocessed voxels (first case), mirroring {'on' if result['mirroring'] else 'off'}, median seconds "
             f"per case, settings interleaved; compared with nnU-Net's tile-by-tile torch loop",
             "",
             "| runtime | tiles per call | s / case | speed-up | largest probability difference | "
             "voxels of another class |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['runtime']} | {row['tile_batch']} | {row['seconds_per_case']:.3f} | "
                     f"{row['speedup']:.2f} | {row['max_probability_difference']:.1e} | "
                     f"{100 * row['voxels_differing']:.3f} % |")
    return "\n".join(lines)
