"""The growing teacher-assistant trainer through nnU-Net's CLI: interrupted, resumed with --c, predicted with stock
nnUNetv2_predict (session workspace of conftest.py, `_debug` schedule: 2 epochs, CPU)."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import DATASET_ID, STUDENT_PLANS
from test_end_to_end import _student_network, train_and_kill_in_second_epoch

from nnunet_kd.core.checkpoints import load_checkpoint as _checkpoint
from nnunet_kd.core.run_core import kd_state_file

TRAINER = "nnUNetTrainerKDGrowingAssistant_debug"

# run in a fresh process with the workspace's nnU-Net paths: load the snapshot the way `--c` does and compare
RESTORE_CHECK = f"""
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunet_kd.core.run_core import kd_state_file
snapshot_path, dataset, plans = sys.argv[1:4]
trainer = get_trainer_from_args(dataset, "3d_fullres", 0, "{TRAINER}", plans, device=torch.device("cpu"))
trainer.load_checkpoint(snapshot_path)
snapshot = torch.load(snapshot_path, map_location="cpu", weights_only=False)
growth = torch.load(kd_state_file(snapshot_path), map_location="cpu", weights_only=False)
assert growth["current_epoch"] == snapshot["current_epoch"]
master = trainer.master.state_dict()
assert master.keys() == growth["master_weights"].keys()
assert all(torch.equal(master[k], v) for k, v in growth["master_weights"].items()), "master weights differ"
assert trainer.stage == growth["stage"], (trainer.stage, growth["stage"])
assert [list(s.widths) for s in trainer.schedule] == [list(s["widths"]) for s in growth["schedule"]]
assert [s.start_epoch for s in trainer.schedule] == [s["start_epoch"] for s in growth["schedule"]]
assert list(trainer.assistant.encoder.output_channels) == list(growth["schedule"][growth["stage"]]["widths"])
restored, saved = trainer.optimizer.state_dict(), snapshot["optimizer_state"]
assert restored["param_groups"] == saved["param_groups"]
assert restored["state"].keys() == saved["state"].keys() and len(saved["state"]) > 0
for k, state in saved["state"].items():
    assert all(torch.equal(restored["state"][k][n], v) for n, v in state.items()), f"optimizer state {{k}} differs"
assert trainer.current_epoch == snapshot["current_epoch"] == 1
print("restored exactly")
"""


@pytest.fixture(scope="module")
def growing_run(workspace, teacher_3d, tmp_path_factory):
    """A growing-assistant training killed in its second epoch, then resumed with --c to the end."""
    fold = workspace.model_folder(TRAINER, STUDENT_PLANS) / "fold_0"
    train_and_kill_in_second_epoch([str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", STUDENT_PLANS, "-device",
                                    "cpu"], {**workspace.env, "nnUNet_KD_teacher": teacher_3d.name}, workspace.root,
                                   fold)
    snapshot = tmp_path_factory.mktemp("growing") / "checkpoint_latest.pth"
    shutil.copy(fold / "checkpoint_latest.pth", snapshot)
    shutil.copy(kd_state_file(str(fold / "checkpoint_latest.pth")), kd_state_file(str(snapshot)))
    logs_before = set(fold.glob("training_log_*.txt"))
    time.sleep(1.1)  # nnU-Net names logs by the second
    resumed = workspace.train(TRAINER, 0, STUDENT_PLANS, env={"nnUNet_KD_teacher": teacher_3d.name}, extra=("--c",))
    (resumed_log,) = set(fold.glob("training_log_*.txt")) - logs_before
    return {"fold": fold, "snapshot": snapshot, "resumed_stdout": resumed.stdout, "resumed_log": resumed_log}


def test_resume_restores_stage_schedule_master_weights_and_optimizer_exactly(workspace, growing_run):
    snapshot = _checkpoint(growing_run["snapshot"])
    snapshot_growth = _checkpoint(kd_state_file(str(growing_run["snapshot"])))
    assert snapshot["current_epoch"] == 1 and snapshot_growth["stage"] == 1  # 4 stages over 2 epochs: 0,0,1,1
    check = workspace.run(sys.executable, "-c", RESTORE_CHECK, str(growing_run["snapshot"]), str(DATASET_ID),
                          STUDENT_PLANS)
    assert "restored exactly" in check.stdout

    # and training went on from there: epoch 1 only, the assistant grew to the last stage, the master moved on
    text = growing_run["resumed_log"].read_text()
    assert re.search(r": Epoch 1\s*$", text, re.M) and not re.search(r": Epoch 0\s*$", text, re.M)
    assert "Assistant grows to widths [32, 64, 128, 256] (stage 4 of 4)" in text
    final = _checkpoint(growing_run["fold"] / "checkpoint_final.pth")
    final_growth = _checkpoint(kd_state_file(str(growing_run["fold"] / "checkpoint_final.pth")))
    assert final["current_epoch"] == final_growth["current_epoch"] == 2 and final_growth["stage"] == 3
    assert final_growth["schedule"] == snapshot_growth["schedule"]
    before = snapshot_growth["master_weights"]
    assert any(not torch.equal(v, before[k]) for k, v in final_growth["master_weights"].items())
    # nnU-Net's own checkpoint holds the student alone; the latest companion went with checkpoint_latest.pth
    assert set(final) >= {"network_weights", "optimizer_state"} and not any(k.startswith("kd_") for k in final)
    assert not (growing_run["fold"] / "checkpoint_latest.kd_state.pth").exists()
    for key in ("train_seg_loss", "train_kd_loss", "train_assistant_seg_loss", "train_assistant_kd_loss"):
        assert final["logging"][key][0] == snapshot["logging"][key][0], f"{key} of epoch 0 changed on resume"
        assert len(final["logging"][key]) == 2 and all(np.isfinite(final["logging"][key]))
    assert final["logging"]["train_assistant_width"] == [2.5, 4.0]  # mean assistant/student channel ratio


def test_checkpoint_holds_the_compact_student_and_stock_predict_runs_it(workspace, growing_run, tmp_path,
                                                                        monkeypatch):
    fold = growing_run["fold"]
    model_folder = fold.parent
    checkpoint = _checkpoint(fold / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_extTrainer", workspace.env["nnUNet_extTrainer"])
    student = _student_network(model_folder)
    weights = checkpoint["network_weights"]
    assert set(weights) == set(student.state_dict())
    assert [m.out_channels for m in student.decoder.seg_layers] == [4, 4, 4]  # background + 3 labels
    assert list(student.encoder.output_channels) == [8, 16, 32, 64]  # the w0.25 student plans
    # the student is the first-channels slice of the master the same checkpoint holds
    master = _checkpoint(kd_state_file(str(fold / "checkpoint_final.pth")))["master_weights"]
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert master[first].shape[0] == 32 and torch.equal(weights[first], master[first][:8])
    decoder_conv = "decoder.stages.0.convs.0.conv.weight"  # reads cat([upsampled, skip]): 32 + 32 of 128 + 128
    assert torch.equal(weights[decoder_conv], torch.cat([master[decoder_conv][:32, :32],
                                                         master[decoder_conv][:32, 128:160]], 1))

    settings = json.loads((fold / "kd_settings.json").read_text())
    assert settings["settings"] == {"alpha": 1.0, "temperature": 2.0, "scales": "full", "warmup": 0.0, "max_width": 4.0,
                                    "stages": 4}
    assert settings["growth"]["student_widths"] == [8, 16, 32, 64]
    assert settings["growth"]["max_widths"] == [32, 64, 128, 256]
    assert settings["student"]["num_parameters"] < settings["growth"]["master_parameters"] / 10
    assert (fold / "progress.png").is_file() and (fold / "validation" / "summary.json").is_file()

    results = tmp_path / "results"
    shutil.copytree(model_folder, results / model_folder.parent.name / model_folder.name)
    out = tmp_path / "predictions"
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", STUDENT_PLANS, "-device", "cpu",
                  "-npp", "0", "-nps", "0", env={"nnUNet_results": str(results)})
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == len(list((workspace.raw / "imagesTs").glob("*_0000.nii.gz"))) > 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[0]))))) <= {0, 1, 2, 3}
