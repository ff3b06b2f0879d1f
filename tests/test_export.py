"""Shipping a student: ONNX export with nnU-Net's own prediction around ONNX Runtime, and nnU-Net's model zip.

A user exports a trained KD student, predicts with `nnunet_kd predict-onnx` in an environment that knows nothing of
the teacher, the trainers folder or nnU-Net's results folder, and gets what stock `nnUNetv2_predict` gives.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATASET, DATASET_ID, STUDENT_PLANS

STUDENT_TRAINER = "nnUNetTrainerKDLogits_debug"


def _stock_predict(workspace, out, *flags, env=None):
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", STUDENT_TRAINER, "-p", STUDENT_PLANS, "-device", "cpu",
                  "-npp", "0", "-nps", "0", "--save_probabilities", *flags, env=env)
    return out


def _without_nnunet_folders(workspace) -> dict:
    # what a deployment machine has: no nnU-Net folders, no trainers folder
    return {key: "" for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")}


def _cases(folder):
    return sorted(p.name for p in folder.glob("*.nii.gz"))


# Float rounding between torch's and a runtime's kernels: near zero almost everywhere, a few voxels further off where
# a 6-iteration student's instance norms divide by near-zero variances. Measured: ONNX Runtime mean 2e-7, max 4e-3;
# OpenVINO on CI's CPU mean 4.5e-7, 99.9th percentile 4e-5, max 1.3e-2 (one voxel). A wrong mirror, tile weight or
# fold shows in the mean and the percentile, which stay tight; the largest single voxel only bounds the tail.
MAX_PROBABILITY_DIFFERENCE = 5e-2


def _same_predictions(a, b) -> None:
    """Probabilities equal up to float rounding; segmentations identical wherever the winning class leads by more than
    the rounding can move it (a 6-iteration student leaves voxels whose top two classes are near-ties)."""
    assert _cases(a) and _cases(a) == _cases(b)
    for case in _cases(a):
        seg_a, seg_b = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / case))) for f in (a, b))
        prob_a, prob_b = (np.load(f / case.replace(".nii.gz", ".npz"))["probabilities"] for f in (a, b))
        difference = np.abs(prob_a - prob_b)
        assert difference.mean() < 1e-5 and np.percentile(difference, 99.9) < 1e-3, case
        assert difference.max() < MAX_PROBABILITY_DIFFERENCE, case
        assert prob_a.shape[1:] == seg_a.shape == seg_b.shape
        top_two = np.sort(prob_a, axis=0)[-2:]
        # a lead larger than twice the voxel's own rounding cannot change hands, so there the two segmentations must
        # agree unless one is not the argmax of its probabilities (a label order or export bug)
        clear = top_two[1] - top_two[0] > 2 * difference.max(axis=0) + 1e-6
        assert np.array_equal(seg_a[clear], seg_b[clear]), case
        assert np.mean(seg_a != seg_b) < 1e-3, case


@pytest.fixture(scope="module")
def onnx_student(workspace, kd_student_3d, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student_onnx"
    # fold 0 only: other tests of the session train further folds of the same trainer
    proc = workspace.run("nnunet_kd", "export", "-d", str(DATASET_ID), "-tr", STUDENT_TRAINER, "-p", STUDENT_PLANS,
                         "-c", "3d_fullres", "-f", "0", "-o", str(out))
    assert "largest logit difference" in proc.stdout
    return out


@pytest.mark.parametrize("flags, runtime_flags", [
    ((), ()),  # the default runtime (OpenVINO) and tile batch
    (("--disable_tta",), ("--runtime", "onnxruntime", "--tile-batch", "1")),
    (("--disable_tta",), ("--runtime", "openvino", "--tile-batch", "3")),
], ids=["mirroring", "no-mirroring-onnxruntime-1", "no-mirroring-openvino-3"])
def test_onnx_student_predicts_what_stock_nnunet_predicts(workspace, onnx_student, tmp_path, flags, runtime_flags):
    expected = _stock_predict(workspace, tmp_path / "torch", *flags)
    workspace.run("nnunet_kd", "predict-onnx", "-i", str(workspace.raw / "imagesTs"), "-o", str(tmp_path / "onnx"),
                  "-m", str(onnx_student), "-npp", "0", "-nps", "0", "--save_probabilities", "--disable_progress_bar",
                  *flags, *runtime_flags, env=_without_nnunet_folders(workspace))
    _same_predictions(expected, tmp_path / "onnx")


def test_export_manifest_records_what_was_exported(onnx_student, kd_student_3d):
    manifest = json.loads((onnx_student / "nnunet_kd_export.json").read_text())
    assert manifest["folds"] == ["0"] and manifest["configuration"] == "3d_fullres"
    assert manifest["trainer_name"] == STUDENT_TRAINER
    assert manifest["folds_checked"]["0"]["max_abs_logit_difference"] < 1e-3
    assert manifest["batched_tiles"]  # the graph takes any number of tiles
    assert (onnx_student / "fold_0" / "network.onnx").stat().st_size > 0
    assert json.loads((onnx_student / "plans.json").read_text()) == json.loads(
        (kd_student_3d / "plans.json").read_text())


def test_export_never_overwrites_and_names_wrong_folders(workspace, onnx_student, kd_student_3d, tmp_path):
    before = (onnx_student / "fold_0" / "network.onnx").stat().st_mtime_ns
    proc = workspace.run("nnunet_kd", "export", "-m", str(kd_student_3d), "-o", str(onnx_student), check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (onnx_student / "fold_0" / "network.onnx").stat().st_mtime_ns == before

    proc = workspace.run("nnunet_kd", "export", "-m", str(kd_student_3d), "-f", "3", "-o", str(tmp_path / "x"),
                         check=False)
    assert proc.returncode == 2 and "Fold(s) 3" in proc.stderr and not (tmp_path / "x").exists()

    # a trained model folder given where an export is expected
    proc = workspace.run("nnunet_kd", "predict-onnx", "-i", str(workspace.raw / "imagesTs"), "-o",
                         str(tmp_path / "p"), "-m", str(kd_student_3d), check=False)
    assert proc.returncode == 2 and "nnunet_kd export" in proc.stderr
    proc = workspace.run("nnunet_kd", "predict-onnx", "-i", str(workspace.raw / "imagesTs"), "-o",
                         str(tmp_path / "p"), "-m", str(onnx_student), "-f", "1", check=False)
    assert proc.returncode == 2 and "holds folds 0" in proc.stderr


def test_student_ships_as_an_nnunet_model_zip_without_the_teacher(workspace, kd_student_3d, tmp_path):
    archive = tmp_path / "student.zip"
    workspace.run("nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", STUDENT_TRAINER,
                  "-p", STUDENT_PLANS, "-f", "0", "-o", str(archive))
    elsewhere = tmp_path / "results"
    elsewhere.mkdir()
    workspace.run("nnUNetv2_install_pretrained_model_from_zip", str(archive), env={"nnUNet_results": str(elsewhere)})
    installed = elsewhere / DATASET / kd_student_3d.name
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file()
    assert [p.name for p in elsewhere.joinpath(DATASET).iterdir()] == [kd_student_3d.name]  # no teacher
    expected = _stock_predict(workspace, tmp_path / "here")
    _same_predictions(expected, _stock_predict(workspace, tmp_path / "installed",
                                               env={"nnUNet_results": str(elsewhere)}))


def test_bench_predict_times_whole_calls_and_scores_each_flag(workspace, teacher_3d, kd_student_3d, onnx_student,
                                                             tmp_path):
    table = tmp_path / "predict.md"
    # the student's model folder is the reference here (a user's first model is the teacher); any trained folder is;
    # the teacher's two folds as an ensemble, its own folds beside the one-fold students
    workspace.run("nnunet_kd", "bench", "predict", str(kd_student_3d), str(onnx_student), f"{teacher_3d}::-f 0 1",
                  "-i", str(workspace.raw / "imagesTs"), "-l", str(workspace.raw / "labelsTs"), "--repeats", "1",
                  "--variants", "-npp 0 -nps 0; --disable_tta -npp 0 -nps 0", "--json", str(tmp_path / "r.json"),
                  "-o", str(table))
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [(r["onnx"], r["flags"], r["folds"]) for r in runs] == [
        (False, "-npp 0 -nps 0", ["0"]), (True, "-npp 0 -nps 0", ["0"]), (False, "-npp 0 -nps 0", ["0", "1"]),
        (False, "--disable_tta -npp 0 -nps 0", ["0"]), (True, "--disable_tta -npp 0 -nps 0", ["0"]),
        (False, "--disable_tta -npp 0 -nps 0", ["0", "1"])]
    ensemble = tmp_path / "ensemble"  # the same segmentations as the stock command for that ensemble
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(ensemble), "-d",
                  str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "1", "-tr", "nnUNetTrainer_debug", "-device", "cpu",
                  "--disable_tta", "-npp", "0", "-nps", "0")
    workspace.run("nnUNetv2_evaluate_folder", str(workspace.raw / "labelsTs"), str(ensemble), "-djfile",
                  str(ensemble / "dataset.json"), "-pfile", str(ensemble / "plans.json"))
    assert runs[5]["mean_dice"] == pytest.approx(
        json.loads((ensemble / "summary.json").read_text())["foreground_mean"]["Dice"], abs=1e-9)
    for run in runs:
        assert 0 <= run["mean_dice"] <= 1
        # start-up is timed in a process of its own: on a loaded machine it can exceed a short call
        assert run["startup_seconds"] > 0 and run["call_seconds"] > 0 and run["seconds_per_case"] >= 0
        assert set(run["stages"]) == {"preprocessing", "network", "export"}
    # the ONNX student and the torch student predict the same segmentations up to voxels at near-ties (OpenVINO's
    # float32 rounds otherwise than torch, and by the number of tiles per call): each such voxel moves a case's Dice
    # by at most about 2 / (voxels of both masks), under 1e-3 for masks of a few thousand voxels: a few such voxels
    assert runs[0]["mean_dice"] == pytest.approx(runs[1]["mean_dice"], abs=2e-3)
    assert runs[0]["call_speedup"] == 1.0 and f"student_onnx ({runs[1]['runtime']})" in table.read_text()


def test_python_api_loads_once_and_predicts_what_nnunetv2_predict_does(workspace, kd_student_3d, onnx_student,
                                                                       tmp_path, monkeypatch):
    """A service's use: load a model once (the trained folder run by torch, or its export), then predict case by case
    from files or arrays, without nnU-Net's folder variables."""
    from nnunet_kd.deploy.batched_prediction import load_predictor

    for key in _without_nnunet_folders(workspace):
        monkeypatch.delenv(key, raising=False)
    expected = _stock_predict(workspace, tmp_path / "stock", "--disable_tta")
    images = sorted((workspace.raw / "imagesTs").glob("*_0000.nii.gz"))
    for name, model in (("torch", kd_student_3d), ("openvino", onnx_student)):
        predictor = load_predictor(model, [0], use_mirroring=False)
        for image in images:
            case = image.name.replace("_0000.nii.gz", ".nii.gz")
            segmentation = predictor.predict_case([image], tmp_path / name / case)
            written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / case)))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(expected / case)))
            assert np.array_equal(segmentation, written)
            assert np.mean(written != reference) < 1e-3, (name, case)
            from_array = predictor.predict_array(sitk.GetArrayFromImage(sitk.ReadImage(str(image)))[None],
                                                 sitk.ReadImage(str(image)).GetSpacing()[::-1])
            assert np.array_equal(from_array, segmentation)


def test_bench_runtimes_compares_every_runtime_and_tile_batch_with_nnunets_loop(workspace, kd_student_3d,
                                                                                onnx_student, tmp_path):
    workspace.run("nnunet_kd", "bench", "runtimes", str(kd_student_3d), "--export", str(onnx_student),
                  "-i", str(workspace.raw / "imagesTs"), "--cases", "1", "--tile-batches", "1", "2",
                  "--runtimes", "torch", "openvino", "onnxruntime", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["runtime"], r["tile_batch"]) for r in rows] == [
        ("nnU-Net", 1), ("torch", 1), ("torch", 2), ("openvino", 1), ("openvino", 2), ("onnxruntime", 1),
        ("onnxruntime", 2)]
    assert rows[0]["speedup"] == 1.0 and rows[0]["max_probability_difference"] == 0
    for row in rows:
        assert row["seconds_per_case"] > 0 and row["max_probability_difference"] < MAX_PROBABILITY_DIFFERENCE
        assert row["voxels_differing"] < 1e-3
