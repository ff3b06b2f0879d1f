"""A trained nnU-Net model as ONNX, and nnU-Net's own predictor running it through a CPU inference runtime.

The exported folder holds `dataset.json` and `plans.json` (as a model folder does), one `fold_<f>/network.onnx` per
fold, and a manifest. `nnunet_kd.deploy.batched_prediction.load_onnx_predictor` gives nnU-Net's predictor (the
tile-batching subclass) with its network replaced by the graph compiled by OpenVINO or ONNX Runtime
(`nnunet_kd.deploy.runtimes`): preprocessing, sliding window, mirroring, fold averaging, resampling and export are
nnU-Net's code. Nothing needs the trainer class, the teacher or this package's trainers folder at prediction time.

nnU-Net pads every image to at least the patch size and cuts it into tiles of exactly that size, so the graph's
spatial shape is fixed, which lets the runtime plan every convolution once; only the number of tiles per call varies.
"""
from __future__ import annotations

import contextlib
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nnunet_kd import __version__
from nnunet_kd.core.checkpoints import file_sha256, load_checkpoint
from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.cpu_inference import use_stock_convolutions
from nnunet_kd.deploy.runtimes import onnxruntime_module

MANIFEST_FILE = "nnunet_kd_export.json"
NETWORK_FILE = "network.onnx"
OPSET = 18


def _model_folds(model_folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[str]:
    available = sorted(p.name[len("fold_"):] for p in model_folder.glob("fold_*") if (p / checkpoint).is_file())
    if not available:
        raise KDConfigurationError(f"No fold of {model_folder} has {checkpoint}: train the model first (or pass "
                                   f"--checkpoint with the checkpoint you have).")
    wanted = [str(f) for f in folds] if folds else available
    missing = [f for f in wanted if f not in available]
    if missing:
        raise KDConfigurationError(f"Fold(s) {', '.join(missing)} of {model_folder} have no {checkpoint}; "
                                   f"available: {', '.join(available)}.")
    return wanted


def export_onnx(model_folder: str | Path, output_folder: str | Path, folds: Sequence[int | str] | None = None,
                checkpoint: str = "checkpoint_final.pth", force: bool = False) -> dict:
    """Write the folds of a trained model folder as ONNX graphs with nnU-Net's plans and dataset.json.

    Each graph is checked against the torch network on a random tile before the manifest is written; the largest
    absolute logit difference is recorded. Returns the manifest.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    onnxruntime = onnxruntime_module()
    model_folder, output_folder = Path(model_folder), Path(output_folder)
    fold_names = _model_folds(model_folder, folds, checkpoint)
    if output_folder.exists() and any(output_folder.iterdir()) and not force:
        raise KDConfigurationError(f"{output_folder} exists and is not empty; choose another folder, or pass --force "
                                   f"to replace the export in it.")
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer search prints every module it inspects
        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), fold_names, checkpoint)
    network = use_stock_convolutions(predictor.network).eval()
    channels = len(predictor.dataset_json.get("channel_names", predictor.dataset_json.get("modality", {})))
    # two tiles, so that the traced graph keeps the number of tiles a free dimension
    tiles = torch.randn(2, channels, *predictor.configuration_manager.patch_size,
                        generator=torch.Generator().manual_seed(0))
    output_folder.mkdir(parents=True, exist_ok=True)
    checks = {}
    for fold, parameters in zip(fold_names, predictor.list_of_parameters):
        network.load_state_dict(parameters)
        target = output_folder / f"fold_{fold}" / NETWORK_FILE
        target.parent.mkdir(exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            torch.onnx.export(network, (tiles,), str(target), input_names=["image"], output_names=["logits"],
                              opset_version=OPSET, dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("tiles")},))
            expected = network(tiles).numpy()
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        # every tile count the predictor may send: a batch, and the single tile of a small image
        difference = max(float(np.abs(session.run(None, {"image": batch.numpy()})[0] - reference).max())
                         for batch, reference in ((tiles, expected), (tiles[:1], expected[:1])))
        if not difference <= 1e-3 * max(1.0, float(np.abs(expected).max())):
            raise RuntimeError(f"The ONNX graph of fold {fold} disagrees with the torch network (largest logit "
                               f"difference {difference:.3g}); please report this with the model's plans.")
        checks[fold] = {"checkpoint_sha256": file_sha256(model_folder / f"fold_{fold}" / checkpoint),
                        "max_abs_logit_difference": difference}
    for name in ("dataset.json", "plans.json"):
        (output_folder / name).write_text((model_folder / name).read_text())
    manifest = {
        "format": "onnx", "opset": OPSET, "source_model_folder": str(model_folder.resolve()),
        "checkpoint": checkpoint, "folds": fold_names, "folds_checked": checks,
        "trainer_name": predictor.trainer_name,
        "configuration": load_checkpoint(model_folder / f"fold_{fold_names[0]}" / checkpoint)["init_args"][
            "configuration"],
        "patch_size": list(predictor.configuration_manager.patch_size), "num_input_channels": channels,
        "batched_tiles": True,
        "inference_allowed_mirroring_axes": (list(predictor.allowed_mirroring_axes)
                                             if predictor.allowed_mirroring_axes is not None else None),
        "nnunet_kd": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    (output_folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(export_folder: str | Path) -> dict:
    export_folder = Path(export_folder)
    path = export_folder / MANIFEST_FILE
    if not path.is_file():
        hint = (" It looks like a trained model folder: predict it with nnUNetv2_predict, or export it first with "
                "`nnunet_kd export`." if any(export_folder.glob("fold_*/checkpoint_*.pth")) else "")
        raise KDConfigurationError(f"{export_folder} is not an nnunet_kd export ({MANIFEST_FILE} is missing).{hint}")
    return json.loads(path.read_text())
