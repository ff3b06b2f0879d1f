"""End to end through nnU-Net's real CLI: plan and preprocess, train teachers and KD students, resume, predict.

These use the session fixtures in conftest.py (a 10-case generated dataset, `_debug` schedules, CPU).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import DATASET_ID, STUDENT_PLANS, copy_model_folder, edit_json

from nnunet_kd.core.checkpoints import count_weights
from nnunet_kd.core.checkpoints import load_checkpoint as _checkpoint
from nnunet_kd.core.settings import KDConfigurationError


def _student_network(model_folder):
    """The network stock nnUNetv2_predict rebuilds from the model folder (trainer class + plans)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,), "checkpoint_final.pth")
    return predictor.network


def test_kd_logits_student_trains_logs_and_checkpoints_only_the_student(workspace, teacher_3d, kd_student_3d,
                                                                        monkeypatch):
    fold = kd_student_3d / "fold_0"
    checkpoint = _checkpoint(fold / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_extTrainer", workspace.env["nnUNet_extTrainer"])
    student = _student_network(kd_student_3d)
    teacher_parameters = count_weights(_checkpoint(teacher_3d / "fold_0" / "checkpoint_final.pth")["network_weights"])
    weights = checkpoint["network_weights"]
    student_parameters = sum(p.numel() for p in student.parameters())
    assert set(weights) == set(student.state_dict()), "checkpoint must hold exactly the student's weights"
    assert count_weights(weights) == student_parameters
    assert student_parameters < teacher_parameters / 5

    logging = checkpoint["logging"]
    assert len(logging["train_seg_loss"]) == len(logging["train_kd_loss"]) == 2
    assert all(np.isfinite(logging["train_kd_loss"])) and min(logging["train_kd_loss"]) > 0
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert re.search(r"seg_loss \d+\.\d+, kd_loss \d+\.\d+", log)
    assert "Knowledge distillation (nnUNetTrainerKDLogits_debug)" in log
    assert (fold / "progress.png").is_file() and (fold / "progress_kd.png").is_file()

    settings = json.loads((fold / "kd_settings.json").read_text())
    assert settings["settings"] == {"alpha": 1.0, "temperature": 2.0, "scales": "full", "warmup": 0.0}
    assert settings["loss"]["activation"] == "softmax"
    assert settings["teacher"]["folds"] == [0] and len(settings["teacher"]["checkpoint_sha256"]) == 1
    assert settings["student"]["num_parameters"] == student_parameters


def test_stock_predict_rebuilds_the_student_without_the_teacher(workspace, kd_student_3d, tmp_path):
    # a results folder holding the student alone: prediction must not need the teacher or any KD setting
    results = tmp_path / "results"
    shutil.copytree(kd_student_3d, results / kd_student_3d.parent.name / kd_student_3d.name)
    out = tmp_path / "predictions"
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerKDLogits_debug", "-p", STUDENT_PLANS,
                  "-device", "cpu", "-npp", "0", "-nps", "0", env={"nnUNet_results": str(results)})
    cases = sorted(p.name for p in (workspace.raw / "imagesTs").glob("*_0000.nii.gz"))
    assert cases
    for case in cases:
        prediction = sitk.ReadImage(str(out / case.replace("_0000", "")))
        reference = sitk.ReadImage(str(workspace.raw / "labelsTs" / case.replace("_0000", "")))
        assert prediction.GetSize() == reference.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2, 3}


def _wait_for(condition, process, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"training ended (exit {process.returncode}) before the expected point")
        time.sleep(0.2)
    pytest.fail("timed out")


def train_and_kill_in_second_epoch(args: list[str], env: dict, cwd, fold) -> None:
    """Run `nnUNetv2_train ARGS` and kill it as soon as its log in `fold` shows the second epoch: the trainer and its
    augmentation workers, the way a crash or a cluster time limit does."""
    process = subprocess.Popen(["nnUNetv2_train", *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: any(re.search(r": Epoch 1\s*$", log.read_text(), re.M)
                              for log in fold.glob("training_log_*.txt")), process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_interrupted_training_resumes_exactly_with_c(workspace, teacher_3d):
    trainer = "nnUNetTrainerKDLogitMatching_debug"
    fold = workspace.model_folder(trainer, STUDENT_PLANS) / "fold_0"
    train_and_kill_in_second_epoch([str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-p", STUDENT_PLANS, "-device",
                                    "cpu"], {**workspace.env, "nnUNet_KD_teacher": teacher_3d.name}, workspace.root,
                                   fold)
    latest = _checkpoint(fold / "checkpoint_latest.pth")
    assert latest["current_epoch"] == 1 and not (fold / "checkpoint_final.pth").exists()
    recorded = json.loads((fold / "kd_settings.json").read_text())
    logs_before = set(fold.glob("training_log_*.txt"))

    # the environment now asks for another alpha: the resumed run must keep the one it started with
    time.sleep(1.1)  # nnU-Net names logs by the second
    result = workspace.train(trainer, 0, STUDENT_PLANS, env={"nnUNet_KD_teacher": teacher_3d.name,
                                                             "nnUNet_KD_alpha": "0.7"}, extra=("--c",))
    assert "Resuming with the settings this training started with" in result.stdout
    final = _checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 2
    for key in ("train_losses", "val_losses", "lrs", "train_seg_loss", "train_kd_loss"):
        assert len(final["logging"][key]) == 2
        assert final["logging"][key][0] == latest["logging"][key][0], f"{key} of epoch 0 changed on resume"
    assert json.loads((fold / "kd_settings.json").read_text())["settings"] == recorded["settings"]
    assert recorded["settings"]["alpha"] == 0.1
    (resumed_log,) = set(fold.glob("training_log_*.txt")) - logs_before
    text = resumed_log.read_text()
    assert re.search(r": Epoch 1\s*$", text, re.M) and not re.search(r": Epoch 0\s*$", text, re.M)


@pytest.fixture(scope="module")
def class_affinity_from_fold_ensemble(workspace, teacher_3d) -> Path:
    """Class-affinity KD on fold 2, taught by the ensemble of the teacher's folds 0 and 1 (one run for two tests)."""
    workspace.train("nnUNetTrainerKDClassAffinity_debug", 2, STUDENT_PLANS,
                    env={"nnUNet_KD_teacher": teacher_3d.name, "nnUNet_KD_teacher_folds": "0,1"})
    return workspace.model_folder("nnUNetTrainerKDClassAffinity_debug", STUDENT_PLANS) / "fold_2"


def test_fold_ensemble_teacher(class_affinity_from_fold_ensemble):
    fold = class_affinity_from_fold_ensemble
    recorded = json.loads((fold / "kd_settings.json").read_text())["teacher"]
    assert recorded["folds"] == [0, 1] and len(set(recorded["checkpoint_sha256"])) == 2
    assert (fold / "checkpoint_final.pth").is_file()


SMALLER_PLANS = "nnUNetPlans_KDStudent_w0.125_s3"


@pytest.fixture(scope="module")
def smaller_student(workspace, kd_student_3d) -> Path:
    """A w0.125, 3-stage KDLogits student taught by the w0.25 KD student (other plans than its own: the teacher ->
    assistant -> student chain), with nnUNet_compile set as many users have it (one run for two tests)."""
    workspace.run("nnunet_kd", "student-plans", str(DATASET_ID), "--width", "0.125", "--stages", "3")
    workspace.train("nnUNetTrainerKDLogits_debug", 0, SMALLER_PLANS,
                    env={"nnUNet_KD_teacher": str(kd_student_3d), "nnUNet_KD_scales": "all", "nnUNet_compile": "t"})
    return workspace.model_folder("nnUNetTrainerKDLogits_debug", SMALLER_PLANS) / "fold_0"


def test_kd_student_teaches_a_smaller_student_with_other_plans(smaller_student):
    recorded = json.loads((smaller_student / "kd_settings.json").read_text())
    assert recorded["teacher"]["plans"] == STUDENT_PLANS and recorded["teacher"]["trainer"] == \
        "nnUNetTrainerKDLogits_debug"
    assert recorded["settings"]["scales"] == "all"
    weights = recorded["loss"]["terms"]["kd_loss"]["weights_per_output"]
    assert len(weights) == 2 and weights[0] == 1.0 and weights[1] == 0.0  # nnU-Net's DS weights, lowest scale 0
    assert recorded["student"]["num_parameters"] < recorded["teacher"]["num_parameters"]


def test_2d_configuration(workspace):
    workspace.train("nnUNetTrainer_debug", 0, configuration="2d")
    workspace.train("nnUNetTrainerKDLogits_debug", 0, STUDENT_PLANS, configuration="2d",
                    env={"nnUNet_KD_teacher": "nnUNetTrainer_debug__nnUNetPlans__2d"})
    fold = workspace.model_folder("nnUNetTrainerKDLogits_debug", STUDENT_PLANS, "2d") / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold / "kd_settings.json").read_text())["student"]["configuration"] == "2d"


def test_missing_teacher_fails_before_training_with_a_clear_message(workspace):
    result = workspace.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "3", "-tr",
                           "nnUNetTrainerKDLogits_debug", "-p", STUDENT_PLANS, "-device", "cpu", check=False)
    assert result.returncode != 0
    assert "Teacher model folder not found" in result.stderr and "nnUNetv2_train" in result.stderr
    fold = workspace.model_folder("nnUNetTrainerKDLogits_debug", STUDENT_PLANS) / "fold_3"
    assert {p.name for p in fold.iterdir() if not p.name.startswith("training_log_")} == set()


# ---- every compatibility problem is caught before any step, and a failed start leaves the folder as it was ----
def _labels_renamed(folder):
    edit_json(folder / "dataset.json", lambda d: d["labels"].update({"tumour": d["labels"].pop("lesion")}))


def _channel_renamed(folder):
    edit_json(folder / "dataset.json", lambda d: d["channel_names"].update({"0": "CT"}))


def _config(plans):
    return plans["configurations"]["3d_fullres"]


def _spacing_changed(folder):
    edit_json(folder / "plans.json", lambda p: _config(p).update(spacing=[3.0, 1.0, 1.0]))


def _transpose_changed(folder):
    edit_json(folder / "plans.json", lambda p: p.update(transpose_forward=[0, 2, 1], transpose_backward=[0, 2, 1]))


def _normalisation_changed(folder):
    edit_json(folder / "plans.json", lambda p: _config(p).update(normalization_schemes=["CTNormalization"]))


MISMATCHES = {
    "labels": (_labels_renamed, "label/region definitions differ"),
    "channels": (_channel_renamed, "input channels differ"),
    "spacing": (_spacing_changed, "target spacing differs"),
    "transpose": (_transpose_changed, "transpose_forward differs"),
    "normalisation": (_normalisation_changed, "normalisation schemes differ"),
}


def _kd_trainer(workspace, monkeypatch, env: dict, fold: int = 4):
    return workspace.trainer_in_process(monkeypatch, "nnUNetTrainerKDLogits_debug", STUDENT_PLANS, env, fold)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith("training_log")}


@pytest.fixture
def previous_run_folder(workspace, kd_student_3d):
    """fold_4 of the KD trainer holding a previous run's files, which a failed start must leave untouched."""
    fold = workspace.model_folder("nnUNetTrainerKDLogits_debug", STUDENT_PLANS) / "fold_4"
    fold.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint_final.pth", "kd_settings.json", "progress.png"):
        shutil.copy(kd_student_3d / "fold_0" / name, fold / name)
    return fold


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
def test_incompatible_teacher_is_refused_before_training(workspace, teacher_3d, previous_run_folder, tmp_path,
                                                         monkeypatch, mismatch):
    edit, message = MISMATCHES[mismatch]
    teacher = copy_model_folder(teacher_3d, tmp_path / "teacher")
    edit(teacher)
    before = _snapshot(previous_run_folder)
    trainer = _kd_trainer(workspace, monkeypatch, {"nnUNet_KD_teacher": str(teacher),
                                                   "nnUNet_KD_teacher_folds": "0"})
    with pytest.raises(KDConfigurationError, match=message) as error:
        trainer.on_train_start()
    assert "cannot teach this student" in str(error.value)
    assert trainer.dataloader_train is None, "no data loading may start before the teacher is accepted"
    assert _snapshot(previous_run_folder) == before


@pytest.mark.parametrize("env, message", [
    ({"nnUNet_KD_teacher": "nnUNetTrainer_debug__nnUNetPlans__3d_lowres"}, "Teacher model folder not found"),
    ({"nnUNet_KD_teacher_folds": "3"}, r"Teacher fold_3 not found .*available: \['fold_0', 'fold_1'\]"),
    ({"nnUNet_KD_teacher_checkpoint": "checkpoint_best_ever.pth"}, "nnUNet_KD_teacher_checkpoint=checkpoint_best"),
])
def test_missing_teacher_parts_are_named(workspace, teacher_3d, previous_run_folder, monkeypatch, env, message):
    before = _snapshot(previous_run_folder)
    trainer = _kd_trainer(workspace, monkeypatch, {"nnUNet_KD_teacher": teacher_3d.name,
                                                   "nnUNet_KD_teacher_folds": "0", **env})
    with pytest.raises(KDConfigurationError, match=message):
        trainer.on_train_start()
    assert _snapshot(previous_run_folder) == before


def test_a_truncated_teacher_checkpoint_is_named_with_the_fix(workspace, teacher_3d, previous_run_folder, tmp_path,
                                                              monkeypatch):
    teacher = copy_model_folder(teacher_3d, tmp_path / "teacher")
    checkpoint = teacher / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # an interrupted copy
    before = _snapshot(previous_run_folder)
    trainer = _kd_trainer(workspace, monkeypatch, {"nnUNet_KD_teacher": str(teacher), "nnUNet_KD_teacher_folds": "0"})
    with pytest.raises(KDConfigurationError, match="corrupt or truncated") as error:
        trainer.on_train_start()
    assert str(checkpoint) in str(error.value) and "nnUNet_KD_teacher_checkpoint" in str(error.value)
    assert _snapshot(previous_run_folder) == before


def test_teacher_loads_with_nnunet_compile_set(workspace, teacher_3d, monkeypatch):
    """nnU-Net's predictor wraps the network in torch.compile when nnUNet_compile is true; the teacher must load."""
    from nnunet_kd.teachers.frozen import TeacherSpec, load_teacher

    monkeypatch.setenv("nnUNet_extTrainer", workspace.env["nnUNet_extTrainer"])
    spec = TeacherSpec(str(teacher_3d), (0,), "checkpoint_final.pth")
    plain = load_teacher(spec, torch.device("cpu")).module
    for value in ("1", "true", "t"):
        monkeypatch.setenv("nnUNet_compile", value)
        compiled = load_teacher(spec, torch.device("cpu")).module
        x = torch.randn(1, 1, 24, 32, 32)
        assert torch.equal(compiled(x), plain(x))


def test_students_predict_and_train_with_nnunet_compile_set(workspace, kd_student_3d, smaller_student, tmp_path):
    """nnU-Net compiles by default on a GPU and many users export nnUNet_compile=t: stock prediction compiles the
    student even on the CPU, and training (which nnU-Net never compiles on the CPU) loads the teacher through nnU-Net's
    predictor, which compiles it."""
    out = tmp_path / "predictions"
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerKDLogits_debug", "-p", STUDENT_PLANS,
                  "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0", env={"nnUNet_compile": "t"})
    assert len(list(out.glob("*.nii.gz"))) == len(list((workspace.raw / "imagesTs").glob("*_0000.nii.gz")))
    # the smaller student trained with nnUNet_compile=t, taught by the KD student (oneDNN convolutions in the teacher)
    assert (smaller_student / "checkpoint_final.pth").is_file()


def test_resume_refuses_a_changed_teacher(workspace, teacher_3d, kd_student_3d, tmp_path, monkeypatch):
    teacher = copy_model_folder(teacher_3d, tmp_path / "teacher")
    fold = workspace.model_folder("nnUNetTrainerKDLogits_debug", STUDENT_PLANS) / "fold_4"
    fold.mkdir(parents=True, exist_ok=True)
    shutil.copy(kd_student_3d / "fold_0" / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    record = json.loads((kd_student_3d / "fold_0" / "kd_settings.json").read_text())
    record["teacher"]["model_folder"] = str(teacher)
    (fold / "kd_settings.json").write_text(json.dumps(record))
    # the teacher was retrained since: same folder, other weights
    state = _checkpoint(teacher / "fold_0" / "checkpoint_final.pth")
    first = next(iter(state["network_weights"]))
    state["network_weights"][first] = state["network_weights"][first] + 1
    torch.save(state, teacher / "fold_0" / "checkpoint_final.pth")

    trainer = _kd_trainer(workspace, monkeypatch, {"nnUNet_KD_teacher": str(teacher)})
    trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    with pytest.raises(KDConfigurationError, match="changed since this training started"):
        trainer.on_train_start()


def test_student_plans_command_refuses_to_overwrite_different_plans(workspace):
    same = workspace.run("nnunet_kd", "student-plans", str(DATASET_ID), "-c", "3d_fullres", "2d", "--width", "0.25")
    assert "unchanged" in same.stdout and "teacher params" in same.stdout
    other = workspace.run("nnunet_kd", "student-plans", str(DATASET_ID), "--width", "0.5", "--name", STUDENT_PLANS,
                          check=False)
    assert other.returncode == 2 and "--force" in other.stderr
    plans = json.loads((workspace.preprocessed / f"{STUDENT_PLANS}.json").read_text())
    features = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    teacher = json.loads((workspace.preprocessed / "nnUNetPlans.json").read_text())
    assert features == [f // 4 for f in
                        teacher["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]]
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == \
        teacher["configurations"]["3d_fullres"]["data_identifier"]


# ---- LCOV-Net student and the class-affinity / multi-scale trainers (Zhao et al. 2023) ----
def test_lcovnet_student_trained_with_stock_trainer_and_with_multiscale_kd(workspace, teacher_3d, tmp_path):
    workspace.run("nnunet_kd", "student-plans", str(DATASET_ID), "--arch", "lcovnet", "--width", "0.5")
    plans = "nnUNetPlans_KDStudent_lcovnet_w0.5"
    # the plans alone make stock nnU-Net build LCOV-Net: no trainer involvement
    workspace.train("nnUNetTrainer_debug", 0, plans)
    workspace.train("nnUNetTrainerKDMultiScale_debug", 0, plans, env={"nnUNet_KD_teacher": teacher_3d.name})

    model = workspace.model_folder("nnUNetTrainerKDMultiScale_debug", plans)
    fold = model / "fold_0"
    recorded = json.loads((fold / "kd_settings.json").read_text())
    terms = recorded["loss"]["terms"]
    assert recorded["loss"]["seg_weight"] == 0.8
    assert terms["soft_loss"]["weight"] == 0.2 and terms["affinity_loss"]["weight"] == 0.1
    assert terms["affinity_loss"]["weights_per_output"] == [0.4, 0.2, 0.2]  # 3 decoder scales on this small patch
    logging = _checkpoint(fold / "checkpoint_final.pth")["logging"]
    assert len(logging["train_soft_loss"]) == len(logging["train_affinity_loss"]) == 2
    assert 0 < min(logging["train_affinity_loss"]) and max(logging["train_affinity_loss"]) <= 1

    out = tmp_path / "predictions"
    results = tmp_path / "results"
    shutil.copytree(model, results / model.parent.name / model.name)  # the student alone
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerKDMultiScale_debug", "-p", plans,
                  "-device", "cpu", "-npp", "0", "-nps", "0", env={"nnUNet_results": str(results)})
    assert len(list(out.glob("*.nii.gz"))) == len(list((workspace.raw / "imagesTs").glob("*.nii.gz")))
    plans_json = json.loads((model / "plans.json").read_text())
    assert plans_json["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == \
        "nnunet_kd.architectures.lcovnet.LCOVNet"


def test_class_affinity_trainer(class_affinity_from_fold_ensemble):
    logging = _checkpoint(class_affinity_from_fold_ensemble / "checkpoint_final.pth")["logging"]
    assert 0 < min(logging["train_kd_loss"]) and max(logging["train_kd_loss"]) <= 1


# ---- benchmark commands (structure and sanity, not timings) ----
def test_bench_step_times_trainers_side_by_side(workspace, teacher_3d, tmp_path):
    out = tmp_path / "step.json"
    result = workspace.run("nnunet_kd", "bench", "step", str(DATASET_ID), "-p", STUDENT_PLANS, "--trainers",
                           "nnUNetTrainer", "nnUNetTrainerKDLogits", "nnUNetTrainerKDMultiScale", "--teacher",
                           str(teacher_3d), "--warmup", "1", "--repeats", "2", "--json", str(out))
    step = json.loads(out.read_text())
    assert [row["trainer"] for row in step["trainers"]] == ["nnUNetTrainer", "nnUNetTrainerKDLogits",
                                                            "nnUNetTrainerKDMultiScale"]
    assert step["trainers"][0]["ratio"] == 1.0
    assert all(np.isfinite(row["ratio"]) and row["ratio"] > 0 and row["step_s"] > 0 for row in step["trainers"])
    assert np.isfinite(step["bound_ratio"]) and step["bound_ratio"] > 1 and step["teacher_forward_s"] > 0
    assert "bound (student step + teacher forward) / student step" in result.stdout
    assert not (workspace.results / "nnUNetTrainerKDMultiScale__nnUNetPlans_KDStudent_w0.25__3d_fullres").exists(), \
        "benchmarks must not write into the results folder"


def test_bench_infer_compares_models_on_the_same_cases(workspace, teacher_3d, kd_student_3d, tmp_path):
    out = tmp_path / "infer.json"
    # without nnUNet_extTrainer, as in the demo: the command must still find this project's trainer classes
    workspace.run("nnunet_kd", "bench", "infer", str(teacher_3d), str(kd_student_3d), "-i",
                  str(workspace.raw / "imagesTs"), "--cases", "1", "--json", str(out), env={"nnUNet_extTrainer": ""})
    infer = json.loads(out.read_text())
    teacher, student = infer["models"]
    assert infer["cases"] == 1 and teacher["speed_ratio"] == 1.0 and student["speed_ratio"] > 0
    assert student["parameters"] < teacher["parameters"] and 0 < student["flops_per_patch"] < \
        teacher["flops_per_patch"]
    assert all(np.isfinite(m["seconds_per_case"]) and m["seconds_per_case"] > 0 and m["peak_memory_mib"] >= 0
               for m in infer["models"])


def test_report_tabulates_models_and_the_gap_kd_closed(workspace, kd_student_3d, tmp_path):
    workspace.train("nnUNetTrainer_debug", 0, STUDENT_PLANS)  # the same student without KD
    out = tmp_path / "report.md"
    workspace.run("nnunet_kd", "report", str(DATASET_ID), "--time-cases", "1", "-o", str(out))
    lines = out.read_text().splitlines()
    assert lines[0] == "## Dataset901_KDSynthetic"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:6] == ["trainer", "plans", "config", "fold", "params", "GFLOPs/patch"]
    assert header[-3:] == ["mean Dice", "cpu s/case", "KD gap closed"]
    rows = {(r[0], r[1], r[2], r[3]): r for r in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:] if line.startswith("|"))}
    assert any("same plans, fold and named schedule" in line for line in lines)  # says what it compared
    kd = rows[("nnUNetTrainerKDLogits_debug", STUDENT_PLANS, "3d_fullres", "0")]
    # a percentage, or n/a where the debug-schedule teacher is no better than the plain student (no gap to close)
    assert re.fullmatch(r"-?\d+%|n/a", kd[-1])
    assert float(kd[-2]) > 0 and float(kd[5]) > 0
    assert rows[("nnUNetTrainer_debug", "nnUNetPlans", "3d_fullres", "0")][-1] == ""
