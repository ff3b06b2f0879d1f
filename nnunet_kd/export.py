"""A trained nnU-Net model as ONNX, and nnU-Net's own predictor running it through ONNX Runtime.

The exported folder holds `dataset.json` and `plans.json` (as a model folder does), one `fold_<f>/network.onnx` per
fold, and a manifest. `OnnxPredictor` is nnU-Net's `nnUNetPredictor` with its network replaced by an ONNX Runtime
session: preprocessing, sliding window, mirroring, fold averaging, resampling and export are nnU-Net's code. Nothing
needs the trainer class, the teacher or this package's trainers folder at prediction time.

nnU-Net feeds its network one tile of exactly the patch size at a time (it pads smaller images), so the graph has
a fixed input shape, which lets ONNX Runtime plan every convolution once.
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
from torch import nn

from nnunet_kd import __version__
from nnunet_kd.checkpoints import load_checkpoint
from nnunet_kd.cpu_inference import use_stock_convolutions
from nnunet_kd.errors import KDConfigurationError
from nnunet_kd.teacher import file_sha256

MANIFEST_FILE = "nnunet_kd_export.json"
NETWORK_FILE = "network.onnx"
OPSET = 18


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise KDConfigurationError("ONNX export and prediction need onnxruntime, onnx and onnxscript: "
                                   "pip install 'nnunet-kd[export]'.") from e
    return onnxruntime


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

    onnxruntime = _onnxruntime()
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
    tile = torch.randn(1, channels, *predictor.configuration_manager.patch_size,
                       generator=torch.Generator().manual_seed(0))
    output_folder.mkdir(parents=True, exist_ok=True)
    checks = {}
    for fold, parameters in zip(fold_names, predictor.list_of_parameters):
        network.load_state_dict(parameters)
        target = output_folder / f"fold_{fold}" / NETWORK_FILE
        target.parent.mkdir(exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            torch.onnx.export(network, (tile,), str(target), input_names=["image"], output_names=["logits"],
                              opset_version=OPSET, dynamo=True, external_data=False)
            expected = network(tile).numpy()
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        difference = float(np.abs(session.run(None, {"image": tile.numpy()})[0] - expected).max())
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
        "inference_allowed_mirroring_axes": (list(predictor.allowed_mirroring_axes)
                                             if predictor.allowed_mirroring_axes is not None else None),
        "nnunet_kd": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    (output_folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


class OnnxRuntimeNetwork(nn.Module):
    """One ONNX Runtime session per fold behind a torch module, so nnU-Net's predictor can drive it unchanged.

    nnU-Net switches folds with `load_state_dict`; here the state is the index of the fold's session.
    """

    def __init__(self, onnx_files: Sequence[str | Path], threads: int | None = None):
        super().__init__()
        onnxruntime = _onnxruntime()
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = [onnxruntime.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])
                         for f in onnx_files]
        self.input_name = self.sessions[0].get_inputs()[0].name
        self.register_buffer("fold_index", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session = self.sessions[int(self.fold_index)]
        logits = session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    def fold_states(self) -> list[dict]:
        return [{"fold_index": torch.tensor(i)} for i in range(len(self.sessions))]


def read_manifest(export_folder: str | Path) -> dict:
    export_folder = Path(export_folder)
    path = export_folder / MANIFEST_FILE
    if not path.is_file():
        hint = (" It looks like a trained model folder: predict it with nnUNetv2_predict, or export it first with "
                "`nnunet_kd export`." if any(export_folder.glob("fold_*/checkpoint_*.pth")) else "")
        raise KDConfigurationError(f"{export_folder} is not an nnunet_kd export ({MANIFEST_FILE} is missing).{hint}")
    return json.loads(path.read_text())


def load_onnx_predictor(export_folder: str | Path, folds: Sequence[int | str] | None = None,
                        tile_step_size: float = 0.5, use_mirroring: bool = True, threads: int | None = None,
                        allow_tqdm: bool = True, verbose: bool = False):
    """nnU-Net's nnUNetPredictor (CPU) whose network is the exported ONNX graph of the chosen folds."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    export_folder = Path(export_folder)
    manifest = read_manifest(export_folder)
    fold_names = [str(f) for f in folds] if folds else manifest["folds"]
    missing = [f for f in fold_names if f not in manifest["folds"]]
    if missing:
        raise KDConfigurationError(f"Fold(s) {', '.join(missing)} are not in the export {export_folder}; it holds "
                                   f"folds {', '.join(manifest['folds'])}.")
    network = OnnxRuntimeNetwork([export_folder / f"fold_{f}" / NETWORK_FILE for f in fold_names], threads)
    plans_manager = PlansManager(json.loads((export_folder / "plans.json").read_text()))
    dataset_json = json.loads((export_folder / "dataset.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notice that CPU predicts off-device
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_mirroring=use_mirroring,
                                    device=torch.device("cpu"), verbose=verbose, allow_tqdm=allow_tqdm)
    mirror_axes = manifest["inference_allowed_mirroring_axes"]
    predictor.manual_initialization(network, plans_manager, plans_manager.get_configuration(manifest["configuration"]),
                                    network.fold_states(), dataset_json, manifest["trainer_name"],
                                    tuple(mirror_axes) if mirror_axes is not None else None)
    return predictor
