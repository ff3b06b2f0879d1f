"""`nnunet_kd prepare`: a Decathlon task or an nnU-Net raw folder made ready for teacher and students in one step,
through nnU-Net's own conversion, planning and preprocessing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from nnunet_kd.data.synthetic import SyntheticSpec, write_dataset
from nnunet_kd.tools.cli import main


def _decathlon_task(folder: Path, source: Path) -> Path:
    """The generated dataset in the Medical Segmentation Decathlon's layout: one file per case, its dataset.json
    listing the training pairs."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    training = []
    for label in sorted((source / "labelsTr").glob("*.nii.gz")):
        case = label.name.removesuffix(".nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")),
                        str(folder / "imagesTr" / label.name))
        sitk.WriteImage(sitk.ReadImage(str(label)), str(folder / "labelsTr" / label.name))
        training.append({"image": f"./imagesTr/{label.name}", "label": f"./labelsTr/{label.name}"})
    labels = json.loads((source / "dataset.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"}, "labels": {str(v): k for k, v in labels.items()},
        "numTraining": len(training), "numTest": 0, "training": training, "test": []}))
    return folder


@pytest.mark.e2e
def test_a_decathlon_task_is_converted_held_out_planned_and_given_student_plans(tmp_path):
    source = write_dataset(tmp_path / "generated", 900, spec=SyntheticSpec(shape=(8, 16, 16), num_training=8,
                                                                           num_test=0))
    task = _decathlon_task(tmp_path / "Task77_Tiny", source)
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1"}
    command = [sys.executable, "-m", "nnunet_kd.tools.cli", "prepare", str(task), "-c", "2d", "--holdout", "2",
               "--holdout-id", "78", "--batch-size", "2", "--widths", "0.25", "-np", "1"]
    first = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr + first.stdout
    held_out = tmp_path / "raw" / "Dataset078_TinyHoldout2"
    assert (tmp_path / "raw" / "Dataset077_Tiny" / "dataset.json").is_file()  # nnU-Net's conversion
    assert len(list((held_out / "labelsTs").iterdir())) == 2 and len(list((held_out / "labelsTr").iterdir())) == 6
    preprocessed = tmp_path / "preprocessed" / "Dataset078_TinyHoldout2"
    assert (preprocessed / "nnUNetPlans_2d").is_dir()
    batch = json.loads((preprocessed / "nnUNetPlans_bs2.json").read_text())
    assert batch["configurations"]["2d"]["batch_size"] == 2
    student = json.loads((preprocessed / "nnUNetPlans_bs2_KDStudent_w0.25.json").read_text())
    assert student["configurations"]["2d"]["batch_size"] == 2  # the students derive from the CPU-batch plans
    assert "nnUNet_KD_teacher=nnUNetTrainer__nnUNetPlans_bs2__2d" in first.stdout

    again = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "$ nnUNetv2" not in again.stdout  # everything was there: nothing converted or planned twice


def test_a_folder_without_a_dataset_id_is_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    source = write_dataset(tmp_path / "generated", 900, spec=SyntheticSpec(shape=(8, 12, 12), num_training=4,
                                                                           num_test=0))
    unnamed = source.rename(tmp_path / "generated" / "Cardiac")
    assert main(["prepare", str(unnamed), "-c", "2d"]) == 2
    assert "pass --dataset-id" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.e2e
def test_cases_of_one_patient_stay_together_in_the_test_set_and_in_nnunets_folds(tmp_path):
    from conftest import REPO

    source = write_dataset(tmp_path / "generated", 900, spec=SyntheticSpec(shape=(8, 16, 16), num_training=16,
                                                                           num_test=0))
    for index in range(16):  # two phases per heart, as ACDC names them
        new = f"patient{index // 2:03d}_frame{index % 2 + 1:02d}"
        (source / "labelsTr" / f"case_{index:03d}.nii.gz").rename(source / "labelsTr" / f"{new}.nii.gz")
        (source / "imagesTr" / f"case_{index:03d}_0000.nii.gz").rename(source / "imagesTr" / f"{new}_0000.nii.gz")
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1",
           "nnUNet_extTrainer": str(REPO / "trainers")}
    prepared = subprocess.run([sys.executable, "-m", "nnunet_kd.tools.cli", "prepare", str(source), "-c", "2d",
                               "--holdout", "3", "--holdout-id", "901", "--group-pattern", r"(patient\d+)_", "-np",
                               "1"], env=env, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr + prepared.stdout
    name = "Dataset901_KDSyntheticHoldout3"
    test = sorted(p.name[:10] for p in (tmp_path / "raw" / name / "labelsTs").iterdir())
    assert len(test) == 4 and len(set(test)) == 2  # two whole hearts
    splits = json.loads((tmp_path / "preprocessed" / name / "splits_final.json").read_text())
    assert len(splits) == 5 and all(not {c[:10] for c in s["train"]} & {c[:10] for c in s["val"]} for s in splits)
    # nnU-Net validates fold 0 on exactly these cases
    trained = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_train"), "901", "2d", "0", "-tr",
                              "nnUNetTrainer_debug", "-device", "cpu"], env={**env, "nnUNet_n_proc_DA": "0"},
                             capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / name / "nnUNetTrainer_debug__nnUNetPlans__2d" / "fold_0" /
                          "validation" / "summary.json").read_text())
    validated = sorted(Path(c["reference_file"]).name.removesuffix(".nii.gz") for c in summary["metric_per_case"])
    assert validated == sorted(splits[0]["val"])
