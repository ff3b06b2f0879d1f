"""The batched sliding window gives what nnU-Net's tile-by-tile loop gives.

Small random networks built from nnU-Net plans (2d and 3d), two "folds" of different weights, images several tiles
large with a last batch that is not full: the batched predictor must return nnU-Net's logits, with and without
mirroring, on the CPU, and the runtimes of an export (OpenVINO, ONNX Runtime) must agree with torch.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from realistic_plans import _dataset_json, _plain_unet_arch, _realistic_plans

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.batched_prediction import (
    BatchedPredictor,
    _even_batches,
    default_tile_batch,
    load_predictor,
)

SHAPES = {"3d_fullres": ([16, 16, 16], (1, 28, 28, 28)), "2d": ([32, 32], (1, 3, 60, 60))}  # 27 tiles each


def _plans(configuration: str) -> tuple[PlansManager, object]:
    plans = _realistic_plans()
    patch, _ = SHAPES[configuration]
    dim = len(patch)
    config = plans["configurations"][configuration]
    config["patch_size"] = patch
    config["architecture"] = _plain_unet_arch(dim, 3, [4, 8, 16], [[3] * dim] * 3, [[1] * dim, [2] * dim, [2] * dim])
    manager = PlansManager(plans)
    return manager, manager.get_configuration(configuration)


def _predictor(cls, configuration: str, mirroring: bool, **kwargs) -> nnUNetPredictor:
    plans_manager, configuration_manager = _plans(configuration)
    dataset_json = _dataset_json()
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1, 3, False)
    folds = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        folds.append({k: torch.randn(v.shape, generator=generator) * 0.3 if v.is_floating_point() else v
                      for k, v in network.state_dict().items()})
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = cls(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False,
                        **kwargs)
    predictor.manual_initialization(network, plans_manager, configuration_manager, folds, dataset_json,
                                    "nnUNetTrainer", (0, 1, 2)[:len(SHAPES[configuration][0])])
    return predictor


def _image(configuration: str) -> torch.Tensor:
    return torch.randn(*SHAPES[configuration][1], generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
@pytest.mark.parametrize("mirroring", [False, True], ids=["no-mirroring", "mirroring"])
def test_batched_tiles_give_nnunets_logits(configuration, mirroring):
    image = _image(configuration)
    expected = _predictor(nnUNetPredictor, configuration, mirroring).predict_logits_from_preprocessed_data(image)
    tiles = len(_predictor(nnUNetPredictor, configuration, False)._internal_get_sliding_window_slicers(
        image.shape[1:]))
    assert tiles > 8 and tiles % 4 != 0  # several batches, of unequal sizes at 4 tiles per call
    for tile_batch in (1, 4, tiles + 5):
        predictor = _predictor(BatchedPredictor, configuration, mirroring, tile_batch=tile_batch)
        logits = predictor.predict_logits_from_preprocessed_data(image)
        assert logits.shape == expected.shape == (3, *image.shape[1:])
        # the half-precision sums of nnU-Net, same tiles in the same order: equal up to convolution rounding
        torch.testing.assert_close(logits.float(), expected.float(), atol=2e-3, rtol=0)
        assert torch.equal(logits.argmax(0), expected.argmax(0)) or (
            (logits.argmax(0) != expected.argmax(0)).float().mean() < 1e-4)


def test_tile_batch_must_be_positive():
    with pytest.raises(KDConfigurationError, match="--tile-batch must be at least 1"):
        BatchedPredictor(tile_batch=0, device=torch.device("cpu"))


@pytest.mark.parametrize("tiles, most, sizes", [(36, 32, [18, 18]), (33, 32, [17, 16]), (64, 32, [32, 32]),
                                               (7, 32, [7]), (9, 4, [3, 3, 3]), (5, 1, [1] * 5), (0, 4, [])])
def test_tiles_go_in_as_few_calls_as_the_tile_batch_allows_of_about_equal_size(tiles, most, sizes):
    batches = _even_batches(list(range(tiles)), most)
    assert [len(b) for b in batches] == sizes and sum(batches, []) == list(range(tiles))


def test_default_tile_batch_follows_the_measurements():
    assert default_tile_batch([32, 40, 40]) == 4  # the demo's 3D student: fastest at 4 tiles per call
    assert default_tile_batch([56, 40]) == 32  # the Hippocampus 2D teacher: gains up to 8-32
    assert default_tile_batch([128, 128, 128]) == 1  # a GPU-sized 3D patch: nnU-Net's own loop
    predictor = _predictor(BatchedPredictor, "3d_fullres", False)
    assert predictor.tile_batch is None and predictor.tiles_per_call == default_tile_batch([16, 16, 16])


@pytest.fixture(scope="module")
def exported_3d(tmp_path_factory):
    """A random 3d network written as `nnunet_kd export` writes it (two folds), without training a model."""
    from nnunet_kd.deploy.export import MANIFEST_FILE, NETWORK_FILE, OPSET

    predictor = _predictor(nnUNetPredictor, "3d_fullres", False)
    folder = tmp_path_factory.mktemp("export")
    tiles = torch.randn(2, 1, *SHAPES["3d_fullres"][0])
    for fold, parameters in enumerate(predictor.list_of_parameters):
        predictor.network.load_state_dict(parameters)
        (folder / f"fold_{fold}").mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(predictor.network.eval(), (tiles,), str(folder / f"fold_{fold}" / NETWORK_FILE),
                              input_names=["image"], output_names=["logits"], opset_version=OPSET, dynamo=True,
                              external_data=False, dynamic_shapes=({0: torch.export.Dim("tiles")},))
    (folder / "plans.json").write_text(json.dumps(predictor.plans_manager.plans))
    (folder / "dataset.json").write_text(json.dumps(predictor.dataset_json))
    (folder / MANIFEST_FILE).write_text(json.dumps({
        "format": "onnx", "folds": ["0", "1"], "trainer_name": "nnUNetTrainer", "configuration": "3d_fullres",
        "inference_allowed_mirroring_axes": [0, 1, 2], "batched_tiles": True}))
    return folder


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("mirroring", [False, True], ids=["no-mirroring", "mirroring"])
def test_export_runtimes_give_torchs_logits_in_batches(exported_3d, runtime, mirroring):
    image = _image("3d_fullres")
    expected = _predictor(nnUNetPredictor, "3d_fullres", mirroring).predict_logits_from_preprocessed_data(image)
    for tile_batch in (1, 4):
        predictor = load_predictor(exported_3d, runtime=runtime, tile_batch=tile_batch, use_mirroring=mirroring)
        assert predictor.network.runtime == runtime and len(predictor.list_of_parameters) == 2
        logits = predictor.predict_logits_from_preprocessed_data(image)
        torch.testing.assert_close(logits.float(), expected.float(), atol=5e-3, rtol=0)


def test_an_export_of_single_tiles_runs_batches_tile_by_tile(exported_3d, tmp_path):
    """Exports written before the batched predictor have a graph of exactly one tile."""
    import shutil

    from nnunet_kd.deploy.export import MANIFEST_FILE

    old = shutil.copytree(exported_3d, tmp_path / "old")
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    del manifest["batched_tiles"]
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    predictor = load_predictor(old, runtime="onnxruntime", tile_batch=4, use_mirroring=False)
    assert not predictor.network.batched
    tiles = torch.randn(3, 1, *SHAPES["3d_fullres"][0])
    batched = load_predictor(exported_3d, runtime="onnxruntime", use_mirroring=False).network(tiles)
    torch.testing.assert_close(predictor.network(tiles), batched, atol=1e-4, rtol=0)


def test_unknown_runtime_and_torch_runtime_for_an_export_are_refused(exported_3d, tmp_path):
    with pytest.raises(KDConfigurationError, match="openvino, onnxruntime"):
        load_predictor(exported_3d, runtime="tensorrt")
    with pytest.raises(KDConfigurationError, match="not an nnunet_kd export"):
        load_predictor(tmp_path, runtime="openvino")


def test_predict_array_returns_a_segmentation_in_the_input_geometry(exported_3d):
    predictor = load_predictor(exported_3d, use_mirroring=False)
    image = np.random.default_rng(0).normal(size=(1, 20, 30, 25)).astype(np.float32)
    segmentation, probabilities = predictor.predict_array(image, [1.0, 1.0, 1.0], return_probabilities=True)
    assert segmentation.shape == image.shape[1:] and probabilities.shape == (3, *image.shape[1:])
    assert np.array_equal(segmentation, probabilities.argmax(0))


def test_bfloat16_runs_where_the_cpu_has_bfloat16_units_and_is_refused_elsewhere(exported_3d):
    import openvino

    image = _image("3d_fullres")
    expected = _predictor(nnUNetPredictor, "3d_fullres", False).predict_logits_from_preprocessed_data(image)
    with pytest.raises(KDConfigurationError, match="openvino"):
        load_predictor(exported_3d, runtime="onnxruntime", precision="bf16")
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(KDConfigurationError, match="no bfloat16 units"):
            load_predictor(exported_3d, runtime="openvino", precision="bf16")
        return
    predictor = load_predictor(exported_3d, runtime="openvino", precision="bf16", use_mirroring=False)
    logits = predictor.predict_logits_from_preprocessed_data(image).float()
    difference = (logits - expected.float()).abs()
    assert 0 < difference.max() < 1  # bfloat16 rounding: visible, and small against the logits
