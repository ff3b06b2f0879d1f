"""nnUNetTrainerKDBarlowTwins end to end through nnU-Net's real CLI on a tiny generated 4-modality dataset (CPU).

One `_debug` run of a FLAIR+T1CE student with its jointly trained T1/T2/FLAIR/T1CE teacher, interrupted after its
first epoch and resumed with --c; the student is then exported, installed into a fresh results folder and predicts
from 2-channel inputs with stock nnUNetv2_predict.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import Workspace, _clean_environment
from test_end_to_end import train_and_kill_in_second_epoch

from nnunet_kd.core.checkpoints import load_checkpoint
from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.data.synthetic import SyntheticSpec
from nnunet_kd.data.synthetic_multimodal import write_multimodal_dataset

DATASET_ID, SUBSET_ID = 930, 931
DATASET = f"Dataset{DATASET_ID}_KDSyntheticMultiModal"
TRAINER = "nnUNetTrainerKDBarlowTwins_debug"
CHANNELS = {"nnUNet_KD_student_channels": "FLAIR,T1CE"}


@pytest.fixture(scope="module")
def bt_workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("barlow")
    ws = Workspace(root, _clean_environment(root))
    write_multimodal_dataset(root / "raw", DATASET_ID, spec=SyntheticSpec(shape=(24, 32, 32), num_training=8,
                                                                         num_test=1, seed=2))
    ws.plan_and_preprocess(DATASET_ID)
    # the student's inputs: the test images with FLAIR and T1CE only, as _0000 and _0001
    ws.run("nnunet_kd", "subset-channels", str(DATASET_ID), "--channels", "FLAIR,T1CE", "--dataset-id",
           str(SUBSET_ID))
    return ws


def _model(ws: Workspace) -> Path:
    return ws.root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"


def _trainer(ws: Workspace, monkeypatch, env: dict):
    return ws.trainer_in_process(monkeypatch, TRAINER, "nnUNetPlans", env, dataset_id=DATASET_ID)


@pytest.fixture(scope="module")
def interrupted(bt_workspace) -> dict:
    """Train, kill the run as its second epoch starts (like a crash or a time limit), keep what it left."""
    fold = _model(bt_workspace) / "fold_0"
    train_and_kill_in_second_epoch([str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
                                   {**bt_workspace.env, **CHANNELS}, bt_workspace.root, fold)
    saved = bt_workspace.root / "interrupted"
    saved.mkdir()
    shutil.copy(fold / "checkpoint_latest.pth", saved / "student.pth")
    shutil.copy(fold / "checkpoint_latest.kd_state.pth", saved / "kd_state.pth")  # teacher and projector
    return {"student": load_checkpoint(saved / "student.pth"), "teacher": load_checkpoint(saved / "kd_state.pth")}


@pytest.fixture(scope="module")
def resumed(bt_workspace, interrupted) -> tuple[subprocess.CompletedProcess, set[Path]]:
    """The interrupted run resumed with --c; its output and the log files it wrote."""
    logs = set((_model(bt_workspace) / "fold_0").glob("training_log_*.txt"))
    time.sleep(1.1)  # nnU-Net names logs by the second
    # the environment now asks for other channels: the resumed run must keep the ones it started with
    result = bt_workspace.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu",
                              "--c", env={"nnUNet_KD_student_channels": "T1CE"})
    return result, set((_model(bt_workspace) / "fold_0").glob("training_log_*.txt")) - logs


def test_interrupted_run_checkpoints_teacher_with_student(bt_workspace, interrupted, monkeypatch):
    student, teacher = interrupted["student"], interrupted["teacher"]
    assert student["current_epoch"] == teacher["current_epoch"] == 1
    # the student's checkpoint holds the 2-channel student; the teacher takes all 4 channels
    assert student["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 2
    assert teacher["teacher_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 4
    assert "teacher_weights" not in student and "network_weights" not in teacher  # the student's checkpoint: student

    # what --c restores: a trainer loading the checkpoint gets the saved teacher weights and optimiser state
    trainer = _trainer(bt_workspace, monkeypatch, {})  # no channel setting: kd_settings.json provides it
    trainer.load_checkpoint(str(_model(bt_workspace) / "fold_0" / "checkpoint_latest.pth"))
    assert trainer.channels.names == ("FLAIR", "T1CE")
    # one optimiser over student and teacher (no projector by default), with momentum for both
    state = student["optimizer_state"]
    n_student, n_teacher = len(list(trainer.network.parameters())), len(list(trainer.teacher.parameters()))
    assert len(state["param_groups"][0]["params"]) == n_student + n_teacher
    assert len(state["state"]) > n_student
    for key, value in teacher["teacher_weights"].items():
        assert torch.equal(trainer.teacher.state_dict()[key], value), key
    restored = trainer.optimizer.state_dict()["state"]
    assert set(restored) == set(state["state"])
    assert all(torch.equal(restored[i]["momentum_buffer"], state["state"][i]["momentum_buffer"]) for i in restored)


def test_resume_refuses_a_missing_teacher_checkpoint(bt_workspace, interrupted, monkeypatch, tmp_path):
    teacher_file = _model(bt_workspace) / "fold_0" / "checkpoint_latest.kd_state.pth"
    shutil.move(teacher_file, tmp_path / "teacher.pth")
    try:
        trainer = _trainer(bt_workspace, monkeypatch, CHANNELS)
        trainer.load_checkpoint(str(_model(bt_workspace) / "fold_0" / "checkpoint_latest.pth"))
        with pytest.raises(KDConfigurationError, match="checkpoint_latest.kd_state.pth is missing"):
            trainer.on_train_start()
        assert trainer.dataloader_train is None
    finally:
        shutil.move(tmp_path / "teacher.pth", teacher_file)


def test_stored_teacher_targets_are_refused_before_training(bt_workspace, monkeypatch):
    # the jointly trained teacher must run: stored outputs of some other teacher cannot replace it
    trainer = _trainer(bt_workspace, monkeypatch, {**CHANNELS, "nnUNet_KD_teacher_targets": "any"})
    with pytest.raises(KDConfigurationError, match="cannot learn from stored teacher targets"):
        trainer.on_train_start()
    assert trainer.dataloader_train is None


def test_resumed_run_continues_exactly(bt_workspace, interrupted, resumed):
    result, new_logs = resumed
    assert "Resuming with the settings this training started with" in result.stdout
    fold = _model(bt_workspace) / "fold_0"
    final = load_checkpoint(fold / "checkpoint_final.pth")
    teacher = load_checkpoint(_model(bt_workspace) / "teacher" / "fold_0" / "checkpoint_final.pth")
    assert final["current_epoch"] == teacher["current_epoch"] == 2
    before = interrupted["student"]["logging"]
    parts = ("train_student_seg_loss", "train_teacher_seg_loss", "train_barlow_twins_loss")
    for key in ("train_losses", "val_losses", "lrs", *parts):
        assert len(final["logging"][key]) == 2
        assert final["logging"][key][0] == before[key][0], f"{key} of epoch 0 changed on resume"
    assert all(np.isfinite(final["logging"][p]).all() and min(final["logging"][p]) > 0 for p in parts)
    assert not any(fold.glob("checkpoint_latest*")) and not any(
        (_model(bt_workspace) / "teacher" / "fold_0").glob("checkpoint_latest*"))
    (log,) = new_logs
    text = log.read_text()
    assert re.search(r": Epoch 1\s*$", text, re.M) and not re.search(r": Epoch 0\s*$", text, re.M)
    assert re.search(r"student_seg_loss \d+\.\d+, teacher_seg_loss \d+\.\d+, barlow_twins_loss \d+\.\d+", text)
    assert "Mean Validation Dice" in text
    assert (fold / "progress.png").is_file()

    recorded = json.loads((fold / "kd_settings.json").read_text())
    assert recorded["settings"] == {"student_channels": "FLAIR,T1CE", "barlow_weight": 1.0, "barlow_lambda": 0.005,
                                    "projector_dim": 0, "teacher_receives_kd": True}
    assert recorded["channels"] == {"names": ["FLAIR", "T1CE"], "indices": [2, 3],
                                    "teacher_names": ["T1", "T2", "FLAIR", "T1CE"]}
    # the model folder describes the student; the teacher's folder the full dataset
    model = _model(bt_workspace)
    assert json.loads((model / "dataset.json").read_text())["channel_names"] == {"0": "FLAIR", "1": "T1CE"}
    plans = json.loads((model / "plans.json").read_text())
    source = json.loads((bt_workspace.root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"] == {
        "0": source["foreground_intensity_properties_per_channel"]["2"],
        "1": source["foreground_intensity_properties_per_channel"]["3"]}
    assert len(plans["configurations"]["3d_fullres"]["normalization_schemes"]) == 2
    assert json.loads((model / "teacher" / "dataset.json").read_text())["channel_names"] == \
        {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T1CE"}
    assert json.loads((model / "teacher" / "plans.json").read_text()) == source
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1


@pytest.mark.parametrize("teacher_receives_kd, projector_dim", [("true", "0"), ("false", "8")])
def test_barlow_twins_gradient_reaches_the_teacher_only_when_set(bt_workspace, monkeypatch, teacher_receives_kd,
                                                                  projector_dim):
    trainer = _trainer(bt_workspace, monkeypatch, {**CHANNELS, "nnUNet_KD_teacher_receives_kd": teacher_receives_kd,
                                                   "nnUNet_KD_projector_dim": projector_dim})
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 4, *patch)
    target = [torch.randint(0, 4, (2, 1, *(round(p * s) for p, s in zip(patch, scale)))).float()
              for scale in trainer._get_deep_supervision_scales()]
    parts = trainer.loss_parts(data, target)
    assert set(parts) == {"student_seg_loss", "teacher_seg_loss", "barlow_twins_loss"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in parts.values())
    bt = parts["barlow_twins_loss"]
    to_teacher = torch.autograd.grad(bt, list(trainer.teacher.parameters()), retain_graph=True, allow_unused=True)
    to_student = torch.autograd.grad(bt, list(trainer.network.parameters()), retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in to_student)
    assert any(g is not None and g.abs().sum() > 0 for g in to_teacher) == (teacher_receives_kd == "true")
    projector = list(trainer.barlow_twins.parameters())
    assert len(projector) == (4 if projector_dim == "8" else 0)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in [*trainer.network.parameters(), *trainer.teacher.parameters(), *projector])
    if projector:
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(bt, projector))


def _predict_args(images: Path, out: Path, processes: int = 0) -> tuple[str, ...]:
    """nnUNetv2_predict runs without worker processes with -npp 0 -nps 0; nnUNetv2_predict_from_modelfolder needs 1."""
    return ("-i", str(images), "-o", str(out), "-device", "cpu", "-npp", str(processes), "-nps", str(processes),
            "--disable_tta", "-f", "0")


def test_exported_student_predicts_from_its_two_channels(bt_workspace, resumed, tmp_path):
    archive = tmp_path / "student.zip"
    bt_workspace.run("nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres",
                     "-tr", TRAINER, "-f", "0")
    fresh = {"nnUNet_results": str(tmp_path / "results")}
    bt_workspace.run("nnUNetv2_install_pretrained_model_from_zip", str(archive), env=fresh)
    images = bt_workspace.root / "raw" / f"Dataset{SUBSET_ID}_KDSyntheticMultiModal_FLAIRT1CE" / "imagesTs"
    assert sorted(p.name for p in images.iterdir()) == ["case_008_0000.nii.gz", "case_008_0001.nii.gz"]
    out = tmp_path / "predictions"
    bt_workspace.run("nnUNetv2_predict", *_predict_args(images, out), "-d", str(DATASET_ID), "-c", "3d_fullres",
                     "-tr", TRAINER, env=fresh)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_008.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(bt_workspace.root / "raw" / DATASET / "labelsTs" /
                                                          "case_008.nii.gz")))
    assert prediction.shape == reference.shape and set(np.unique(prediction)) <= {0, 1, 2, 3}
    assert not (tmp_path / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "teacher").exists()


def test_full_channel_inputs_fail_instead_of_predicting(bt_workspace, resumed, tmp_path):
    # stock nnU-Net normalises each input channel with the model's per-channel plans before any of our code runs:
    # with 4 files for a 2-channel student it stops in its preprocessing (documented in the README), never predicts
    out = tmp_path / "predictions"
    result = bt_workspace.run("nnUNetv2_predict", *_predict_args(bt_workspace.root / "raw" / DATASET / "imagesTs", out),
                              "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, check=False)
    assert result.returncode != 0 and "normalization_schemes[c]" in result.stderr
    assert not list(out.glob("*.nii.gz"))


def test_saved_teacher_predicts_from_all_channels(bt_workspace, resumed, tmp_path):
    out = tmp_path / "teacher"
    bt_workspace.run("nnUNetv2_predict_from_modelfolder", "-m", str(_model(bt_workspace) / "teacher"),
                     *_predict_args(bt_workspace.root / "raw" / DATASET / "imagesTs", out, processes=1))
    assert (out / "case_008.nii.gz").is_file()


@pytest.mark.parametrize("fold, channels, message", [
    (1, "flair,T1CE", r"flair not in dataset.json channel_names \(T1, T2, FLAIR, T1CE\).*did you mean FLAIR"),
    (2, "T1,T2,FLAIR,T1CE", "selects every channel"),
    (3, "", "nnUNet_KD_student_channels is empty"),
])
def test_channel_selection_errors_through_the_cli(bt_workspace, fold, channels, message):
    folder = _model(bt_workspace) / f"fold_{fold}"
    result = bt_workspace.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", str(fold), "-tr", TRAINER, "-device",
                              "cpu", env={"nnUNet_KD_student_channels": channels}, check=False)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    # a wrong name fails before nnU-Net writes anything; a missing setting only after nnU-Net's own log file
    written = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    assert {n for n in written if not n.startswith("training_log_")} == set()
    if channels:
        assert not written


def test_check_channels_measures_what_a_fewer_modality_student_sees(bt_workspace, tmp_path):
    """On the generated data the student's channels preprocess alike with or without the others; where the others
    reach further (T1 non-zero in slices where FLAIR and T1CE are zero) nnU-Net's crop differs, and it is shown."""
    from nnunet_kd.students.modalities import select_channels, subset_preprocessing_difference

    same = bt_workspace.run("nnunet_kd", "check-channels", str(DATASET_ID), "--channels", "FLAIR,T1CE", "--cases", "2")
    assert "0 of 2 cases preprocess differently" in same.stdout

    raw = bt_workspace.raw.parent / DATASET
    dataset_json = json.loads((raw / "dataset.json").read_text())
    plans = json.loads((bt_workspace.root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    files = []
    for channel in range(4):
        image = sitk.ReadImage(str(raw / "imagesTr" / f"case_000_{channel:04d}.nii.gz"))
        array = sitk.GetArrayFromImage(image)
        array[:, :4] = 0 if channel in (2, 3) else 100  # FLAIR and T1CE end 4 rows before T1 and T2 do
        edited = sitk.GetImageFromArray(array)
        edited.CopyInformation(image)
        files.append(str(tmp_path / f"case_{channel:04d}.nii.gz"))
        sitk.WriteImage(edited, files[-1])
    result = subset_preprocessing_difference(files, plans, "3d_fullres", dataset_json,
                                             select_channels(dataset_json, "FLAIR,T1CE"))
    assert not result["same_crop"]
    assert result["crop_subset"][1][0] == 4 and result["crop_full"][1][0] == 0
