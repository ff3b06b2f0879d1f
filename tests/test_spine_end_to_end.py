"""Issue #13 end to end on generated spines, through the stock nnU-Net CLI on the CPU with `_debug` schedules:
convert, plan and preprocess, train both stages, a KD student of stage 2 and the one-shot baseline, then the one
inference command and the evaluation. Debug-length models segment badly; what is checked is that every step runs as
a user runs it and writes what it promises (the search's logic is checked exactly in test_spine_pipeline.py)."""
import json

import pytest
import SimpleITK as sitk
from conftest import Workspace, _clean_environment

from nnunet_kd.core.checkpoints import load_checkpoint

STAGE1, STAGE2, ONE_SHOT = "Dataset511_SpineLocation", "Dataset512_SpineVertebrae", "Dataset513_SpineOneShot"
# stage 2's trainers: nnU-Net's mirroring except head-feet
STAGE2_TEACHER, STAGE2_STUDENT = "nnUNetTrainerSpineStage2_debug", "nnUNetTrainerSpineStage2KDLogits_debug"


@pytest.fixture(scope="module")
def spine(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("spine")
    ws = Workspace(root, _clean_environment(root))
    (root / "raw").mkdir()
    ws.run("nnunet_kd", "spine", "generate", str(root / "verse"), "-n", "5", "--seed", "3")
    ws.run("nnunet_kd", "spine", "convert", str(root / "verse"), "--id", "511", "--stage2-spacing", "4",
           "--folds", "5")
    ws.plan_and_preprocess(511, 512, 513)
    for dataset, trainer in (("511", "nnUNetTrainer_debug"), ("512", STAGE2_TEACHER), ("513", "nnUNetTrainer_debug")):
        ws.run("nnUNetv2_train", dataset, "3d_fullres", "0", "-tr", trainer, "-device", "cpu")
    ws.run("nnunet_kd", "student-plans", "512", "-c", "3d_fullres", "--width", "0.25")
    ws.run("nnUNetv2_train", "512", "3d_fullres", "0", "-tr", STAGE2_STUDENT, "-p", "nnUNetPlans_KDStudent_w0.25",
           "-device", "cpu", env={"nnUNet_KD_teacher": f"{STAGE2_TEACHER}__nnUNetPlans__3d_fullres"})
    return ws


def _model(ws, dataset, trainer="nnUNetTrainer_debug", plans="nnUNetPlans"):
    return ws.root / "results" / dataset / f"{trainer}__{plans}__3d_fullres"


def test_stage2_folds_keep_each_scan_together(spine):
    splits = json.loads((spine.root / "preprocessed" / STAGE2 / "splits_final.json").read_text())
    for split in splits:
        scans_train = {name.split("_v")[0].split("_end")[0] for name in split["train"]}
        scans_val = {name.split("_v")[0].split("_end")[0] for name in split["val"]}
        assert not scans_train & scans_val
    stage2_json = json.loads((_model(spine, STAGE2, STAGE2_TEACHER) / "dataset.json").read_text())
    assert stage2_json["spine_stage2"] == {"spacing": 4.0, "patch_mm": 96.0, "margin_mm": 8.0}


def test_stage2_is_never_mirrored_head_feet(spine):
    plans = json.loads((spine.root / "preprocessed" / STAGE2 / "nnUNetPlans.json").read_text())
    head_feet = plans["transpose_forward"].index(0)  # the converted patches are head up along axis 0
    for model in (_model(spine, STAGE2, STAGE2_TEACHER),
                  _model(spine, STAGE2, STAGE2_STUDENT, "nnUNetPlans_KDStudent_w0.25")):
        allowed = load_checkpoint(model / "fold_0" / "checkpoint_final.pth")["inference_allowed_mirroring_axes"]
        assert sorted(allowed) == sorted({0, 1, 2} - {head_feet})


def test_one_command_from_cts_to_numbered_vertebrae_with_a_kd_student(spine):
    out = spine.root / "predicted"
    result = spine.run("nnunet_kd", "spine", "predict", "-i", str(spine.root / "verse"), "-o", str(out),
                       "--stage1", str(_model(spine, STAGE1)),
                       "--stage2", str(_model(spine, STAGE2, STAGE2_STUDENT, "nnUNetPlans_KDStudent_w0.25")),
                       "--disable_tta")
    assert "stage 1" in result.stdout
    assert not list(out.glob("*msk*"))  # a VerSe folder's masks are not taken for CTs
    for ct in sorted((spine.root / "verse").glob("*_ct.nii.gz")):
        name = ct.name.removesuffix("_ct.nii.gz")
        predicted, reference = sitk.ReadImage(str(out / f"{name}.nii.gz")), sitk.ReadImage(str(ct))
        assert predicted.GetSize() == reference.GetSize() and predicted.GetSpacing() == reference.GetSpacing()
        centroids = json.loads((out / f"{name}_centroids.json").read_text())
        assert [c["label"] for c in centroids] == list(range(1, len(centroids) + 1))
        assert all(c["confidence"] in ("high", "low") and 0 <= c["inside_spine"] <= 1 for c in centroids)
    scores = spine.run("nnunet_kd", "spine", "evaluate", str(out), str(spine.root / "verse"), "--json",
                       str(spine.root / "scores.json"))
    assert "detection rate" in scores.stdout
    summary = json.loads((spine.root / "scores.json").read_text())["summary"]
    assert 0 <= summary["detection_rate"] <= 1 and 0 <= summary["mean_dice"] <= 1


def test_the_one_shot_baseline_is_scored_the_same_way(spine):
    images = spine.root / "baseline_in"
    images.mkdir()
    for ct in (spine.root / "verse").glob("*_ct.nii.gz"):
        (images / ct.name.replace("_ct.nii.gz", "_0000.nii.gz")).symlink_to(ct)
    out = spine.root / "baseline_out"
    spine.run("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "513", "-c", "3d_fullres", "-f", "0",
              "-tr", "nnUNetTrainer_debug", "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0")
    scores = spine.run("nnunet_kd", "spine", "evaluate", str(out), str(spine.root / "verse"))
    assert "detection rate" in scores.stdout


def test_a_stage2_model_without_the_memory_channel_is_refused(spine, tmp_path):
    refused = spine.run("nnunet_kd", "spine", "predict", "-i", str(spine.root / "verse"), "-o", str(tmp_path),
                        "--stage1", str(_model(spine, STAGE1)), "--stage2", str(_model(spine, STAGE1)), check=False)
    assert refused.returncode == 2 and "is not a stage-2 spine model" in refused.stderr
    assert not list(tmp_path.iterdir())
