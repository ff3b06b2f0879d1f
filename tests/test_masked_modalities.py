"""Fewer-modality students on a dataset whose channels nnU-Net normalises inside the non-zero mask: the loader carries
every channel, so nnU-Net's augmentation must mask the dataset's channels, not the student's (shorter) list."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import Workspace, _clean_environment

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.data.synthetic import SyntheticSpec
from nnunet_kd.data.synthetic_multimodal import write_multimodal_dataset

DATASET_ID = 933
DATASET = f"Dataset{DATASET_ID}_KDSyntheticMasked"


@pytest.fixture(scope="module")
def masked_workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("masked")
    ws = Workspace(root, _clean_environment(root))
    # a 16 x 24 x 24 case in 28 x 36 x 36 of zeros: nnU-Net crops to a box of a quarter of the image, so it
    # normalises every (z-scored) channel inside the mask
    write_multimodal_dataset(root / "raw", DATASET_ID, "KDSyntheticMasked",
                             SyntheticSpec(shape=(16, 24, 24), num_training=6, num_test=0, seed=3), zero_border=6)
    ws.plan_and_preprocess(DATASET_ID)
    return ws


def _mask_step_channels(trainer) -> list[int]:
    """The channels the mask step of the training augmentation nnU-Net built for this trainer zeroes outside the
    mask (nnUNet_n_proc_DA=0: the loader and its transforms run in this process)."""
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform

    train_loader, _ = trainer.get_dataloaders()
    transforms = train_loader.data_loader.transforms.transforms
    return [c for t in transforms if isinstance(t, MaskImageTransform) for c in t.apply_to_channels]


def test_barlow_twins_masks_every_channel_the_dataset_masks(masked_workspace, monkeypatch):
    plans = json.loads((masked_workspace.root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["use_mask_for_norm"] == [True] * 4  # what this test is about
    trainer = masked_workspace.trainer_in_process(
        monkeypatch, "nnUNetTrainerKDBarlowTwins_debug", "nnUNetPlans",
        {"nnUNet_KD_student_channels": "FLAIR,T1CE", "nnUNet_n_proc_DA": "0"}, dataset_id=DATASET_ID)
    trainer.initialize()
    assert trainer.configuration_manager.use_mask_for_norm == [True, True]  # the student's plans, 2 channels
    # every channel of the full-channel patch, not channels 0 and 1 only (T1 and T2, which the student never sees)
    assert _mask_step_channels(trainer) == [0, 1, 2, 3]


# ---- privileged-modality KD: a FLAIR + T1CE student distilled from a frozen teacher trained on all four channels ----
TEACHER = "nnUNetTrainer_debug__nnUNetPlans__3d_fullres"
CHANNELS = {"nnUNet_KD_student_channels": "FLAIR,T1CE"}


def _model(ws: Workspace, trainer: str) -> Path:
    return ws.root / "results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


def _train(ws: Workspace, trainer: str, env: dict, *extra: str):
    return ws.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", *extra,
                  env=env)


@pytest.fixture(scope="module")
def full_channel_teacher(masked_workspace) -> Path:
    _train(masked_workspace, "nnUNetTrainer_debug", {})
    return _model(masked_workspace, "nnUNetTrainer_debug")


@pytest.fixture(scope="module")
def stored_targets(masked_workspace, full_channel_teacher) -> str:
    masked_workspace.run("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher", TEACHER,
                         "-f", "0", "--disable_tta", "-device", "cpu")
    return f"{TEACHER}__f0__nomirror"


def _student_channels(model: Path) -> dict:
    return json.loads((model / "dataset.json").read_text())["channel_names"]


# online KDLogits (the teacher gets all channels of the augmented patch) trains and predicts in the study below
@pytest.mark.parametrize("trainer, stored", [
    ("nnUNetTrainerStudent_debug", False),  # the plain baseline on the same channels of the same cases
    ("nnUNetTrainerKDLogits_debug", True),  # from targets computed once on all channels
    ("nnUNetTrainerKDGrowingAssistant_debug", False),
])
def test_fewer_channel_student_trains_resumes_and_predicts_from_its_own_files(
        masked_workspace, full_channel_teacher, stored_targets, trainer, stored, tmp_path):
    env = {**CHANNELS, "nnUNet_KD_teacher": TEACHER, "nnUNet_KD_seed": "0"}
    if stored:
        env["nnUNet_KD_teacher_targets"] = stored_targets
    results = tmp_path / "results"  # each case trains into a results folder of its own
    (results / DATASET).mkdir(parents=True)
    shutil.copytree(full_channel_teacher, results / DATASET / TEACHER)
    env["nnUNet_results"] = str(results)
    _train(masked_workspace, trainer, env)
    model = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    assert _student_channels(model) == {"0": "FLAIR", "1": "T1CE"}
    assert (model / "fold_0" / "validation" / "summary.json").is_file()
    if trainer != "nnUNetTrainerStudent_debug":
        record = json.loads((model / "fold_0" / "kd_settings.json").read_text())
        assert record["student"]["channels"]["indices"] == [2, 3]
        assert ("teacher_targets" in record) == stored
    # --c with the variable unset: the model folder says which channels the checkpoint was built for
    resumed = _train(masked_workspace, trainer, {k: v for k, v in env.items() if k != "nnUNet_KD_student_channels"},
                     "--c")
    assert "Continuing with the input channels this model was trained on" in resumed.stdout
    # stock prediction from the student's two files only
    inputs = tmp_path / "student_inputs"
    inputs.mkdir()
    for case in ("case_000", "case_001"):
        for new, old in ((0, 2), (1, 3)):  # FLAIR is _0002, T1CE _0003 in the dataset
            shutil.copy(masked_workspace.root / "raw" / DATASET / "imagesTr" / f"{case}_{old:04d}.nii.gz",
                        inputs / f"{case}_{new:04d}.nii.gz")
    out = tmp_path / "predictions"
    masked_workspace.run("nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c",
                         "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "0",
                         "-nps", "0", env={"nnUNet_results": str(results)})
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz"]


def test_stored_targets_are_refused_where_the_students_files_crop_differently(
        masked_workspace, stored_targets, monkeypatch, tmp_path):
    # T1 of every training case made non-zero in the border: all four channels crop to the whole image, FLAIR and
    # T1CE alone to the inner box, so the student would predict on other voxels than the targets describe
    raw = tmp_path / "raw"
    shutil.copytree(masked_workspace.root / "raw" / DATASET, raw / DATASET)
    for t1 in (raw / DATASET / "imagesTr").glob("*_0000.nii.gz"):
        image = sitk.ReadImage(str(t1))
        array = sitk.GetArrayFromImage(image)
        array[array == 0] = 1.0
        edited = sitk.GetImageFromArray(array)
        edited.CopyInformation(image)
        sitk.WriteImage(edited, str(t1))
    trainer = masked_workspace.trainer_in_process(
        monkeypatch, "nnUNetTrainerKDLogits_debug", "nnUNetPlans",
        {**CHANNELS, "nnUNet_KD_teacher": TEACHER, "nnUNet_KD_teacher_targets": stored_targets,
         "nnUNet_raw": str(raw)}, results=tmp_path / "results", dataset_id=DATASET_ID)
    with pytest.raises(KDConfigurationError, match="the student's channels alone crop to") as error:
        trainer.on_train_start()
    assert "distil online" in str(error.value)


def test_study_pairs_fewer_channel_students_and_predicts_the_test_set_from_their_files(
        masked_workspace, full_channel_teacher, tmp_path):
    raw = masked_workspace.root / "raw" / DATASET
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in ("case_000", "case_001"):  # training cases as a stand-in test set: this checks the wiring only
        for channel in range(4):
            shutil.copy(raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz", images)
        shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", labels)
    study = tmp_path / "study"
    result = masked_workspace.run(
        "nnunet_kd", "study", str(DATASET_ID), "-c", "3d_fullres", "-p", "nnUNetPlans", "--teacher", TEACHER,
        "--trainers", "nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "--seeds", "0", "--schedule", "debug",
        "--student-channels", "FLAIR,T1CE", "--test-images", str(images), "--test-labels", str(labels),
        "--device", "cpu", "--time-cases", "1", "-o", str(study))
    assert "The students see the channels FLAIR,T1CE only" in result.stdout
    assert sorted(p.name for p in (study / "test_inputs").iterdir()) == [
        "case_000_0000.nii.gz", "case_000_0001.nii.gz", "case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    kd_run = study / "runs" / "seed_0" / DATASET / "nnUNetTrainerKDLogits_debug__nnUNetPlans__3d_fullres"
    assert _student_channels(kd_run) == {"0": "FLAIR", "1": "T1CE"}
    record = json.loads((kd_run / "fold_0" / "kd_settings.json").read_text())
    assert record["student"]["channels"]["indices"] == [2, 3] and "teacher_targets" not in record
    comparison = json.loads((study / "comparison.json").read_text())
    assert comparison["comparisons"]["test"]["nnUNetTrainerKDLogits"]["seeds"] == [0]
    assert [row["model"] for row in comparison["costs"]] == ["teacher", "nnUNetTrainerStudent",
                                                               "nnUNetTrainerKDLogits"]
    refused = masked_workspace.run(
        "nnunet_kd", "study", str(DATASET_ID), "-c", "3d_fullres", "-p", "nnUNetPlans", "--teacher", TEACHER,
        "--seeds", "0", "--schedule", "debug", "--student-channels", "FLAIR,T2X", "--device", "cpu",
        "-o", str(tmp_path / "other"), check=False)
    assert refused.returncode == 2 and "--student-channels='FLAIR,T2X': T2X not in dataset.json" in refused.stderr
