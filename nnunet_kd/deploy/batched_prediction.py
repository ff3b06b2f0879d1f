"""nnU-Net's sliding window with its tiles in batches.

nnU-Net's predictor feeds its network one tile at a time. A wide teacher keeps a CPU's vector units busy even so; a
narrow student does not: most of its time per tile goes to per-call overhead and to convolutions too thin to fill a
vector register (measured: BENCHMARKS.md; on a GPU a small patch may likewise leave the device idle, not measured
here). `BatchedPredictor` overrides only the tile loop of nnU-Net's `nnUNetPredictor`: the same tile positions
(`_internal_get_sliding_window_slicers`), the same Gaussian weighting, the same mirroring
(`_internal_maybe_mirror_and_predict`, applied to the whole batch) and the same half-precision accumulation in the
same tile order. Only the network sees N tiles at once. Everything around the tile loop (preprocessing, fold
averaging, resampling, export, the worker processes) is nnU-Net's code.

For services that predict many cases in one process, `load_predictor` loads a model once (a trained model folder run
by torch, or an `nnunet_kd export` folder run by OpenVINO or ONNX Runtime) and `BatchedPredictor.predict_case` /
`predict_array` return a case's segmentation in its input geometry; nnU-Net's own methods (`predict_from_files`,
`predict_from_files_sequential`, ...) work on the same object.

Instance normalisation, which nnU-Net's networks use, normalises each sample on its own, so a tile's logits do not
depend on its neighbours in the batch; they can differ from batch-1 logits only by floating-point rounding, because
a convolution library may pick another algorithm for another batch size.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.export import MANIFEST_FILE, NETWORK_FILE, read_manifest
from nnunet_kd.deploy.runtimes import ExportedNetwork, default_runtime

# Tiles per call by default: as many as hold about this many voxels, at most MAX_TILE_BATCH. Measured on a 2-core CPU
# (BENCHMARKS.md): a 3D student's 32x40x40 tiles ran fastest at 4 per call (8 was slower again: the activations
# outgrow the cache), a 2D teacher's 56x40 tiles gained up to 8-32 per call; nnU-Net's large GPU patches get 1.
VOXELS_PER_CALL = 200_000
MAX_TILE_BATCH = 32


def default_tile_batch(patch_size: Sequence[int]) -> int:
    return int(max(1, min(MAX_TILE_BATCH, round(VOXELS_PER_CALL / np.prod(patch_size)))))


def _even_batches(items: Sequence, most: int) -> list[Sequence]:
    """`items` in as few batches of at most `most` as possible, their sizes differing by one at most: 36 tiles at 32
    per call go as 18 + 18, not 32 + 4, whose small second call runs its tiles at a fraction of the speed."""
    calls = -(-len(items) // most)
    size, larger = divmod(len(items), max(calls, 1))
    bounds = [0]
    for call in range(calls):
        bounds.append(bounds[-1] + size + (call < larger))
    return [items[start:end] for start, end in zip(bounds, bounds[1:])]


class BatchedPredictor(nnUNetPredictor):
    """`nnUNetPredictor` that runs `tile_batch` sliding-window tiles per network call (1: nnU-Net's own loop;
    None: `default_tile_batch` of the model's patch size)."""

    def __init__(self, *args, tile_batch: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if tile_batch is not None and tile_batch < 1:
            raise KDConfigurationError(f"--tile-batch must be at least 1 (1: nnU-Net's own tile-by-tile loop), got "
                                       f"{tile_batch}.")
        self.tile_batch = tile_batch

    @property
    def tiles_per_call(self) -> int:
        return self.tile_batch or default_tile_batch(self.configuration_manager.patch_size)

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True) -> torch.Tensor:
        tiles_per_call = self.tiles_per_call
        if tiles_per_call == 1:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        results_device = self.device if do_on_device else torch.device("cpu")
        predicted_logits = n_predictions = predictions = gaussian = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            # half precision as in nnU-Net: the accumulated logits are then the same numbers, added in the same order
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = (compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                         value_scaling_factor=10, device=results_device)
                        if self.use_gaussian else 1)
            for batch in _even_batches(slicers, tiles_per_call):
                tiles = torch.stack([data[s] for s in batch]).to(self.device)
                predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
                for prediction, s in zip(predictions, batch):
                    if self.use_gaussian:
                        prediction *= gaussian
                    predicted_logits[s] += prediction
                    n_predictions[s[1:]] += gaussian
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, reduce "
                                   "value_scaling_factor in compute_gaussian or increase the dtype of "
                                   "predicted_logits to fp32")
            return predicted_logits
        except Exception:
            # nnU-Net retries on the CPU after a device OOM: free this attempt's arrays before it does
            del predicted_logits, n_predictions, predictions, gaussian
            empty_cache(self.device)
            empty_cache(results_device)
            raise

    def predict_case(self, image_files: Sequence[str | Path], output_file: str | Path | None = None,
                     return_probabilities: bool = False):
        """One case from its image files (one per input channel, `_0000`, `_0001`, ... as nnUNetv2_predict reads
        them): the segmentation in the image's own geometry, and with `return_probabilities` the class
        probabilities too. `output_file` (e.g. `case.nii.gz`): also write the segmentation there."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        data, _, properties = preprocessor.run_case([str(f) for f in image_files], None, self.plans_manager,
                                                    self.configuration_manager, self.dataset_json)
        return self._segment(data, properties, output_file, return_probabilities)

    def predict_array(self, image: np.ndarray, spacing: Sequence[float], return_probabilities: bool = False):
        """One case from an array (channels, z, y, x; spacing in the same axis order, as SimpleITK's reader in
        nnU-Net gives them): the segmentation (z, y, x), and with `return_probabilities` the probabilities."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        data, _, properties = preprocessor.run_case_npy(np.asarray(image), None, {"spacing": list(spacing)},
                                                        self.plans_manager, self.configuration_manager,
                                                        self.dataset_json)
        return self._segment(data, properties, None, return_probabilities)

    def _segment(self, data: np.ndarray, properties: dict, output_file: str | Path | None,
                 return_probabilities: bool):
        logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
            return_probabilities=return_probabilities)
        if output_file is not None:
            segmentation = result[0] if return_probabilities else result
            Path(output_file).parent.mkdir(parents=True, exist_ok=True)
            self.plans_manager.image_reader_writer_class().write_seg(segmentation, str(output_file), properties)
        return result


def load_predictor(model: str | Path, folds: Sequence[int | str] | None = None, *, device: str = "cpu",
                   tile_batch: int | None = None, use_mirroring: bool = True, tile_step_size: float = 0.5,
                   runtime: str | None = None, precision: str = "f32", threads: int | None = None,
                   checkpoint: str = "checkpoint_final.pth", allow_tqdm: bool = False) -> BatchedPredictor:
    """A model loaded once for many predictions: a trained model folder
    (`$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`, run by torch on `device`) or an
    `nnunet_kd export` folder (run on the CPU by `runtime`: "openvino" or "onnxruntime"; default OpenVINO where
    installed; `precision` "bf16" is OpenVINO's faster opt-in, see `nnunet_kd.deploy.runtimes`). `folds`: default every
    fold that has the checkpoint (or every exported fold), averaged as nnUNetv2_predict does. Mirroring on by
    default, as in nnUNetv2_predict."""
    model = Path(model)
    if (model / MANIFEST_FILE).is_file() or runtime not in (None, "torch"):
        read_manifest(model)  # names the problem: not an export, or a model folder to export first
        return load_onnx_predictor(model, folds, tile_step_size, use_mirroring, threads, allow_tqdm,
                                   runtime=runtime, tile_batch=tile_batch, precision=precision)
    if precision != "f32":
        raise KDConfigurationError(f"--precision {precision} is an OpenVINO setting: export the model "
                                   f"(`nnunet_kd export`) and predict the export.")
    from nnunet_kd.core.settings import ensure_ext_trainer
    from nnunet_kd.deploy.cpu_inference import use_onednn_convolutions

    ensure_ext_trainer()  # the student's trainer class lives in this package's trainers folder
    torch_device = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's trainer search prints every module it inspects
        predictor = BatchedPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring,
                                     perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                     allow_tqdm=allow_tqdm, tile_batch=tile_batch)
        predictor.initialize_from_trained_model_folder(
            str(model), tuple(folds) if folds else None, checkpoint)
    if torch_device.type == "cpu":
        use_onednn_convolutions(getattr(predictor.network, "_orig_mod", predictor.network))
    if threads:
        torch.set_num_threads(threads)
    return predictor


def load_onnx_predictor(export_folder: str | Path, folds: Sequence[int | str] | None = None,
                        tile_step_size: float = 0.5, use_mirroring: bool = True, threads: int | None = None,
                        allow_tqdm: bool = True, verbose: bool = False, runtime: str | None = None,
                        tile_batch: int | None = None, precision: str = "f32") -> BatchedPredictor:
    """nnU-Net's predictor (CPU, `tile_batch` tiles per call) whose network is the exported graph of the chosen folds,
    compiled by `runtime` (default: OpenVINO where installed, else ONNX Runtime) in `precision`
    (`nnunet_kd.deploy.runtimes`)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    export_folder = Path(export_folder)
    manifest = read_manifest(export_folder)
    fold_names = [str(f) for f in folds] if folds else manifest["folds"]
    missing = [f for f in fold_names if f not in manifest["folds"]]
    if missing:
        raise KDConfigurationError(f"Fold(s) {', '.join(missing)} are not in the export {export_folder}; it holds "
                                   f"folds {', '.join(manifest['folds'])}.")
    network = ExportedNetwork([export_folder / f"fold_{f}" / NETWORK_FILE for f in fold_names],
                              runtime or default_runtime(), threads, batched=manifest.get("batched_tiles", False),
                              precision=precision)
    plans_manager = PlansManager(json.loads((export_folder / "plans.json").read_text()))
    dataset_json = json.loads((export_folder / "dataset.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notice that CPU predicts off-device
        predictor = BatchedPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring,
                                     device=torch.device("cpu"), verbose=verbose, allow_tqdm=allow_tqdm,
                                     tile_batch=tile_batch)
    mirror_axes = manifest["inference_allowed_mirroring_axes"]
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration(manifest["configuration"]),
                                    network.fold_states(), dataset_json, manifest["trainer_name"],
                                    tuple(mirror_axes) if mirror_axes is not None else None)
    return predictor
