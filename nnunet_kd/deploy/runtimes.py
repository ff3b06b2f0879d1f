"""An exported network run by a CPU inference runtime, behind the torch module interface nnU-Net's predictor drives.

Two runtimes read the same `network.onnx`: OpenVINO and ONNX Runtime. OpenVINO was measured faster for every network
tried (BENCHMARKS.md, "A CT in seconds on a CPU"), so it is the default where installed (`pip install
'nnunet-kd[openvino]'`); ONNX Runtime, which export needs anyway to check its graphs, is the fallback.

Precision: float32 by default, outputs within float rounding of torch's. `precision="bf16"` lets OpenVINO run the
convolutions in bfloat16 on CPUs that have bfloat16 units (AMX, AVX512_BF16), about 2.5x faster for a student there;
its logits then differ from float32 by ~0.1-0.2, which moves a few voxels at class borders (measured in
BENCHMARKS.md). It is an explicit choice, never the default: OpenVINO would otherwise lower the precision on such CPUs
on its own.

nnU-Net switches folds with `load_state_dict`; here the state is the index of the fold's compiled network.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_kd.core.settings import KDConfigurationError

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = ("f32", "bf16")


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError as e:
        raise KDConfigurationError("ONNX export and prediction need onnxruntime, onnx and onnxscript: "
                                   "pip install 'nnunet-kd[export]'.") from e
    return onnxruntime


def openvino_module():
    try:
        import openvino
    except ImportError as e:
        raise KDConfigurationError("The OpenVINO runtime is not installed: pip install 'nnunet-kd[openvino]', or "
                                   "choose --runtime onnxruntime.") from e
    return openvino


def default_runtime() -> str:
    """OpenVINO where it is installed (measured faster), else ONNX Runtime."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnxruntime"
    return "openvino"


def _onnxruntime_runner(onnx_file: Path, threads: int | None, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    if precision != "f32":
        raise KDConfigurationError(f"ONNX Runtime runs the export in float32 only; --precision {precision} needs "
                                   f"--runtime openvino.")
    onnxruntime = onnxruntime_module()
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda tiles: session.run(None, {input_name: tiles})[0]


def _openvino_runner(onnx_file: Path, threads: int | None, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    openvino = openvino_module()
    core = openvino.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise KDConfigurationError("This CPU has no bfloat16 units (AMX or AVX512_BF16), where --precision bf16 "
                                   "would only emulate it: use --precision f32.")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(onnx_file), "CPU", config)
    return lambda tiles: compiled(tiles)[0]


_RUNNERS = {"openvino": _openvino_runner, "onnxruntime": _onnxruntime_runner}


class ExportedNetwork(nn.Module):
    """One compiled network per fold. `batched`: the graph takes any number of tiles (exports since the batched
    predictor); older exports take exactly one, and a batch is then run tile by tile."""

    def __init__(self, onnx_files: Sequence[str | Path], runtime: str, threads: int | None = None,
                 batched: bool = True, precision: str = "f32"):
        super().__init__()
        if runtime not in _RUNNERS:
            raise KDConfigurationError(f"Unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
        if precision not in PRECISIONS:
            raise KDConfigurationError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
        self.runtime, self.batched, self.precision = runtime, batched, precision
        self.runners = [_RUNNERS[runtime](Path(f), threads, precision) for f in onnx_files]
        self.register_buffer("fold_index", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.runners[int(self.fold_index)]
        tiles = x.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = run(tiles) if self.batched or len(tiles) == 1 else np.concatenate([run(t[None]) for t in tiles])
        return torch.from_numpy(np.asarray(logits)).to(x.device)

    def fold_states(self) -> list[dict]:
        return [{"fold_index": torch.tensor(i)} for i in range(len(self.runners))]
