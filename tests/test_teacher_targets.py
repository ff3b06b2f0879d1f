"""Stored teacher targets: the pure pieces, then through nnU-Net's real CLI, data loader and augmentation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from conftest import DATASET_ID, STUDENT_PLANS, copy_model_folder, edit_json

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.deploy.cpu_inference import use_onednn_convolutions
from nnunet_kd.teachers.compact_targets import encode_top_k, tail_profile_sums
from nnunet_kd.teachers.stored_targets import (
    FORMATS,
    INDICES_SUFFIX,
    MANIFEST,
    TAIL_SUFFIX,
    TARGETS_FOLDER,
    _save_case,
    _store_case,
    case_files,
    save_tail_profile,
)
from nnunet_kd.teachers.targets_loader import _ChannelStack, dense_targets, split_batch, teacher_outputs_from_targets


# ---- pure pieces ----
def test_targets_are_normalised_over_valid_voxels_and_padding_takes_the_students_output():
    torch.manual_seed(0)
    values = torch.randn(2, 3, 8, 8, 8)
    validity = torch.ones(2, 1, 8, 8, 8)
    validity[..., 6:] = 0  # padded: the loader and the spatial transform leave zeros in every channel there
    student = [torch.randn(2, 3, 8, 8, 8, requires_grad=True), torch.randn(2, 3, 4, 4, 4, requires_grad=True)]

    full, coarse = teacher_outputs_from_targets(torch.cat([values * validity, validity], 1), student)

    assert torch.allclose(full[..., :6], values[..., :6])
    assert torch.equal(full[..., 6:], student[0].detach()[..., 6:])
    assert not full.requires_grad
    # a coarse voxel averages its 2x2x2 valid fine voxels; one over padding only keeps the student's output
    expected = torch.nn.functional.avg_pool3d(values, 2)
    assert torch.allclose(coarse[..., :3], expected[..., :3], atol=1e-6)
    assert torch.equal(coarse[..., 3:], student[1].detach()[..., 3:])


def test_half_valid_border_voxels_are_rescaled_not_shrunk():
    values = torch.full((1, 2, 4, 4), 3.0)
    validity = torch.ones(1, 1, 4, 4)
    validity[..., 0] = 0.6  # a border voxel interpolated from 60 % image and 40 % zero padding
    (teacher,) = teacher_outputs_from_targets(torch.cat([values * validity, validity], 1), torch.zeros(1, 2, 4, 4))
    assert torch.allclose(teacher, values)


@pytest.mark.parametrize("target_format", ["dense", "topk"])
def test_a_case_is_stored_alike_whole_or_in_slabs(tmp_path, monkeypatch, target_format):
    """A many-class CT is encoded a slab at a time (memory): the files and statistics equal those of one slab."""
    import blosc2

    from nnunet_kd.teachers import stored_targets

    logits = 4 * torch.randn(12, 10, 6, 7, generator=torch.Generator().manual_seed(0))
    manifest = {"format": FORMATS[target_format], "top_k": 3, "activation": "softmax"}
    stored = {}
    for slab_voxels in (10 ** 6, 2 * 6 * 7):  # the whole case, then slabs of two planes
        monkeypatch.setattr(stored_targets, "SLAB_VOXELS", slab_voxels)
        folder = tmp_path / str(slab_voxels)
        folder.mkdir()
        statistics = _store_case(logits, "case", folder, manifest, (4, 6, 7))
        arrays = [blosc2.open(str(p))[:] for p in case_files(folder, "case", manifest) if p.suffix == ".b2nd"]
        stored[slab_voxels] = statistics, arrays, sorted(p.name for p in folder.iterdir())
    (whole, whole_arrays, whole_files), (slabs, slab_arrays, slab_files) = stored.values()
    assert whole_files == slab_files and all(np.array_equal(a, b) for a, b in zip(whole_arrays, slab_arrays))
    assert whole.keys() == slabs.keys() and all(whole[k] == pytest.approx(slabs[k], rel=1e-5) for k in whole)
    if target_format == "dense":
        assert whole["max_abs_probability_error"] < 1e-3  # float16 rounding only
    else:
        assert whole_arrays[0].shape == (4, 10, 6, 7) and whole_arrays[1].shape == (3, 10, 6, 7)
        profiles = [np.load(tmp_path / str(n) / f"case{TAIL_SUFFIX}") for n in stored]
        assert profiles[0].shape == (12, 12) and np.allclose(*profiles, rtol=1e-6)


def test_split_batch_separates_image_from_targets():
    data = torch.arange(2 * 6 * 4).float().reshape(2, 6, 4)
    image, targets = split_batch(data, 2)
    assert torch.equal(image, data[:, :2]) and torch.equal(targets, data[:, 2:])


def test_channel_stack_is_cropped_like_one_array_with_validity_zero_in_padding():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    targets = rng.normal(size=(3, 6, 7, 8)).astype(np.float16)
    bbox = [[-2, 4], [3, 10], [0, 8]]  # below the first axis and beyond the second

    patch = crop_and_pad_nd(_ChannelStack(image, targets), bbox, 0)

    assert patch.shape == (5, 6, 7, 8) and patch.dtype == np.float32
    np.testing.assert_array_equal(patch[0], crop_and_pad_nd(image, bbox, 0)[0])
    np.testing.assert_array_equal(patch[1:4], crop_and_pad_nd(targets.astype(np.float32), bbox, 0))
    inside = np.zeros((6, 7, 8), bool)
    inside[2:, :4] = True
    np.testing.assert_array_equal(patch[4], inside.astype(np.float32))


# ---- through nnU-Net ----
TEACHER_NAME = "nnUNetTrainer_debug__nnUNetPlans__3d_fullres"


def test_manifest_records_the_teacher_the_data_and_the_precision(workspace, targets_3d):
    manifest = json.loads((targets_3d / MANIFEST).read_text())
    teacher = manifest["teacher"]
    assert teacher["model_folder"].endswith(TEACHER_NAME) and teacher["folds"] == [0]
    assert teacher["mirroring"] is True and teacher["mirror_axes"] == [0, 1, 2]
    assert len(teacher["checkpoint_sha256"][0]) == 64
    data = manifest["data"]
    assert (data["dataset"], data["configuration"], data["data_identifier"]) == (
        workspace.preprocessed.name, "3d_fullres", "nnUNetPlans_3d_fullres")
    assert manifest["stored"] == "log_softmax" and manifest["format"] == "blosc2-float16"
    assert len(manifest["cases"]) == 10 and "finished" in manifest
    for case in manifest["cases"].values():
        assert case["bytes"] > 0 and case["max_abs_error"] < 0.02 and case["max_abs_probability_error"] < 1e-3


def test_stored_targets_round_trip_to_the_teachers_prediction(workspace, teacher_3d, targets_3d, monkeypatch):
    import blosc2
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", workspace.env["nnUNet_extTrainer"])
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(teacher_3d), (0,), "checkpoint_final.pth")
    use_onednn_convolutions(predictor.network)  # as the writer runs the teacher on the CPU: the same arithmetic
    data = blosc2.open(str(workspace.preprocessed / "nnUNetPlans_3d_fullres" / "case_000.b2nd"))[:]
    expected = torch.log_softmax(predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)), 0)
    stored = torch.from_numpy(blosc2.open(str(targets_3d / "case_000.b2nd"))[:])
    assert stored.dtype == torch.float16 and stored.shape == expected.shape
    error = (stored.float() - expected).abs().max().item()
    assert error <= json.loads((targets_3d / MANIFEST).read_text())["cases"]["case_000"]["max_abs_error"] + 1e-6


def test_rerun_continues_and_other_settings_are_refused(workspace, targets_3d, tmp_path):
    folder = tmp_path / "targets"
    shutil.copytree(targets_3d, folder)
    (folder / "case_003.b2nd").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd")}
    args = ("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher", TEACHER_NAME, "-f",
            "0", "-device", "cpu", "--name", str(folder))
    workspace.run(*args)
    assert (folder / "case_003.b2nd").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd") if p.name in kept} == kept

    refused = workspace.run(*args, "--disable_tta", check=False)
    assert refused.returncode == 2 and "another teacher or other settings" in refused.stderr
    assert "--force" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd") if p.name in kept} == kept


def test_openvino_runtime_stores_the_torch_targets_within_float_rounding(workspace, targets_3d, tmp_path):
    import blosc2

    folder = tmp_path / "openvino"
    args = ("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher", TEACHER_NAME, "-f",
            "0", "--name", str(folder))
    on_gpu = workspace.run(*args, "--runtime", "openvino", "-device", "cuda", check=False)
    assert on_gpu.returncode == 2 and "runs the teacher on the CPU" in on_gpu.stderr and not folder.exists()
    result = workspace.run(*args, "--runtime", "openvino")
    assert "runtime openvino" in result.stdout
    manifest = json.loads((folder / MANIFEST).read_text())
    torch_manifest = json.loads((targets_3d / MANIFEST).read_text())
    assert manifest["teacher"].pop("runtime") == "openvino" and "runtime" not in torch_manifest["teacher"]
    assert manifest["teacher"] == torch_manifest["teacher"]
    assert manifest["cases"].keys() == torch_manifest["cases"].keys()
    for identifier in manifest["cases"]:
        stored, reference = (torch.from_numpy(blosc2.open(str(f / f"{identifier}.b2nd"))[:]).float()
                             for f in (folder, targets_3d))
        # the same network in float32 under another library: probabilities within rounding, the same classes
        assert (stored.exp() - reference.exp()).abs().max() < 5e-3
        assert (stored.argmax(0) != reference.argmax(0)).float().mean() < 1e-3

    mixed = workspace.run(*args, check=False)  # torch targets into the OpenVINO folder: one folder, one runtime
    assert mixed.returncode == 2 and "another teacher or other settings" in mixed.stderr


def _trainer(workspace, monkeypatch, env: dict, fold: int = 0, trainer: str = "nnUNetTrainerKDLogits_debug",
             results=None):
    return workspace.trainer_in_process(monkeypatch, trainer, STUDENT_PLANS, env, fold, results)


def _augmented_batches(workspace, monkeypatch, targets_folder: Path, tmp_path, count: int = 8):
    """A KD trainer reading `targets_folder`, and `count` batches of its training loader (seeded, in this process)."""
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = _trainer(workspace, monkeypatch, {"nnUNet_KD_teacher_targets": str(targets_folder),
                                                "nnUNet_n_proc_DA": "0"}, results=tmp_path / "results")
    trainer.initialize()
    trainer.prepare_distillation()
    loader, _ = trainer.get_dataloaders()
    return trainer, [next(loader) for _ in range(count)]


def test_targets_follow_the_spatial_augmentation_in_lock_step(workspace, targets_3d, tmp_path, monkeypatch):
    """Targets made from the one-hot label, through nnU-Net's own loader and augmentation, still agree with the
    augmented label: rotation, scaling, mirroring and cropping moved them together."""
    import blosc2

    folder = tmp_path / "onehot"
    shutil.copytree(targets_3d, folder)
    data_folder = workspace.preprocessed / "nnUNetPlans_3d_fullres"
    for path in folder.glob("*.b2nd"):
        seg = blosc2.open(str(data_folder / path.name.replace(".b2nd", "_seg.b2nd")))[:][0].clip(0)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(seg).long(), 4).permute(3, 0, 1, 2).float()
        _save_case(torch.log_softmax(20 * onehot, 0).half().numpy(), path, (32, 40, 40))
    trainer, batches = _augmented_batches(workspace, monkeypatch, folder, tmp_path)
    agree = total = border = 0
    for batch in batches:
        image, stored = split_batch(batch["data"], trainer.num_input_channels)
        assert image.shape[1] == 1 and stored.shape[1] == 4 + 1
        (teacher,) = teacher_outputs_from_targets(stored, torch.zeros_like(stored[:, :4]))
        valid = stored[:, -1] >= 0.5
        label = batch["target"][0][:, 0]
        agree += (teacher.argmax(1) == label)[valid].sum().item()
        total += valid.sum().item()
        border += (stored[:, -1] < 1).sum().item()
    assert total > 0
    assert agree / total >= 0.99, f"only {agree / total:.4f} of valid voxels agree"
    assert border > 0, "no padding seen: the loader's patches reach beyond these small images"


def test_top_k_targets_follow_the_augmentation_from_their_nearest_source_voxel(workspace, targets_3d, tmp_path,
                                                                               monkeypatch):
    """Top-2 targets of the one-hot label, through nnU-Net's loader and augmentation: they agree with the augmented
    label, and every value is one that was stored (moved, never blended: class indices cannot be interpolated)."""
    import blosc2

    folder = tmp_path / "onehot_top2"
    shutil.copytree(targets_3d, folder)
    data_folder = workspace.preprocessed / "nnUNetPlans_3d_fullres"
    stored_values = set()
    for path in folder.glob("*.b2nd"):
        seg = blosc2.open(str(data_folder / path.name.replace(".b2nd", "_seg.b2nd")))[:][0].clip(0)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(seg).long(), 4).permute(3, 0, 1, 2).float()
        onehot[1] += 0.5 * onehot[0]  # a second class with a distinct value wherever the label is background
        indices, values = encode_top_k(torch.log_softmax(20 * onehot, 0), 2)
        _save_case(values.numpy(), path, (32, 40, 40))
        _save_case(indices.numpy(), path.with_name(path.name.replace(".b2nd", INDICES_SUFFIX)), (32, 40, 40))
        save_tail_profile(tail_profile_sums(torch.log_softmax(20 * onehot, 0), indices),
                          path.with_name(path.name.replace(".b2nd", TAIL_SUFFIX)))
        stored_values |= set(values.float().unique().tolist())
    edit_json(folder / MANIFEST, lambda m: m.update(format="blosc2-topk-float16", top_k=2))
    trainer, batches = _augmented_batches(workspace, monkeypatch, folder, tmp_path)
    agree = total = border = 0
    for batch in batches:
        image, stored = split_batch(batch["data"], trainer.num_input_channels)
        assert image.shape[1] == 1 and stored.shape[1] == 2 + 3 + 1  # indices, values + tail, validity
        valid = stored[:, -1] >= 0.5
        assert set(stored[:, 2:5].permute(1, 0, 2, 3, 4)[:, valid].unique().tolist()) <= stored_values
        dense = dense_targets(stored, trainer.stored_targets.manifest, 4, trainer.tail_weights)
        (teacher,) = teacher_outputs_from_targets(dense,
                                                  torch.zeros(stored.shape[0], 4, *stored.shape[2:]))
        label = batch["target"][0][:, 0]
        agree += (teacher.argmax(1) == label)[valid].sum().item()
        total += valid.sum().item()
        border += (stored[:, -1] < 1).sum().item()
    assert total > 0 and border > 0
    assert agree / total >= 0.99, f"only {agree / total:.4f} of valid voxels agree"


def test_top_k_targets_written_in_parts_teach_kd_and_parts_of_other_settings_are_refused(workspace, teacher_3d,
                                                                                         tmp_path):
    name = "top2_in_parts"
    common = ("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher", TEACHER_NAME, "-f",
              "0", "-device", "cpu", "--format", "topk", "--disable_tta", "--name", name, "-num_parts", "2")
    args = (*common, "--top-k", "2")
    first = workspace.run(*args, "-part_id", "0")
    assert "part 1 of 2" in first.stdout and "once every part has run" in first.stdout
    folder = workspace.preprocessed / TARGETS_FOLDER / name
    part0 = json.loads((folder / "manifest_part0of2.json").read_text())
    assert part0["format"] == "blosc2-topk-float16" and part0["top_k"] == 2 and len(part0["cases"]) == 5
    assert all((folder / f"{case}{suffix}").is_file() for case in part0["cases"]
               for suffix in (INDICES_SUFFIX, TAIL_SUFFIX))

    refused = workspace.run(*common, "--top-k", "3", "-part_id", "1", check=False)
    assert refused.returncode == 2 and "another teacher or other settings" in refused.stderr
    assert not (folder / "manifest_part1of2.json").exists()

    workspace.run(*args, "-part_id", "1")
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd")}
    assert len(kept) == 20
    workspace.run(*args, "-part_id", "0")  # a finished part does nothing on rerun
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.b2nd")} == kept

    results = tmp_path / "results"
    fold = _train_from_targets(workspace, folder, results, "nnUNetTrainerKDLogits_debug")
    _assert_trained_without_a_teacher(fold, folder)
    record = json.loads((fold / "kd_settings.json").read_text())["teacher_targets"]
    assert record["format"] == "blosc2-topk-float16" and record["top_k"] == 2

    refused = workspace.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr",
                            "nnUNetTrainerKDLogitMatching_debug", "-p", STUDENT_PLANS, "-device", "cpu",
                            env={"nnUNet_KD_teacher_targets": name, "nnUNet_results": str(results)}, check=False)
    assert refused.returncode != 0 and "write dense targets" in refused.stdout + refused.stderr


def _train_from_targets(workspace, targets_3d, results, trainer: str) -> Path:
    """Train `trainer` from the stored targets into `results`, with a teacher setting that names no folder (so no
    teacher network could be loaded); its fold_0."""
    workspace.train(trainer, 0, STUDENT_PLANS, env={"nnUNet_KD_teacher_targets": targets_3d.name,
                                                    "nnUNet_KD_teacher": "a_folder_that_does_not_exist",
                                                    "nnUNet_results": str(results)})
    return results / workspace.preprocessed.name / f"{trainer}__{STUDENT_PLANS}__3d_fullres" / "fold_0"


@pytest.fixture(scope="module")
def kd_from_targets(workspace, targets_3d, tmp_path_factory) -> Path:
    """nnUNet_results holding nnUNetTrainerKDLogits_debug trained from the stored targets (fold 0)."""
    results = tmp_path_factory.mktemp("kd_from_targets") / "results"
    _train_from_targets(workspace, targets_3d, results, "nnUNetTrainerKDLogits_debug")
    return results


def _assert_trained_without_a_teacher(fold: Path, targets_3d) -> None:
    record = json.loads((fold / "kd_settings.json").read_text())
    assert "teacher" not in record
    assert record["teacher_targets"]["folder"] == str(targets_3d.resolve())
    assert record["teacher_targets"]["teacher"]["folds"] == [0]
    assert "no teacher network is loaded" in next(fold.glob("training_log_*.txt")).read_text()
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()


def test_kd_logits_trains_from_stored_targets_without_a_teacher(workspace, targets_3d, kd_from_targets):
    _assert_trained_without_a_teacher(
        kd_from_targets / workspace.preprocessed.name / f"nnUNetTrainerKDLogits_debug__{STUDENT_PLANS}__3d_fullres"
        / "fold_0", targets_3d)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerKDMultiScale_debug", "nnUNetTrainerKDGrowingAssistant_debug"])
def test_other_kd_trainers_train_from_stored_targets_without_a_teacher(workspace, targets_3d, tmp_path, trainer):
    _assert_trained_without_a_teacher(_train_from_targets(workspace, targets_3d, tmp_path / "results", trainer),
                                      targets_3d)


def test_stock_predict_of_a_student_trained_from_stored_targets(workspace, kd_from_targets, tmp_path):
    out = tmp_path / "predictions"
    workspace.run("nnUNetv2_predict", "-i", str(workspace.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerKDLogits_debug", "-p", STUDENT_PLANS,
                  "-device", "cpu", "-npp", "0", "-nps", "0", env={"nnUNet_results": str(kd_from_targets)})
    assert len(list(out.glob("*.nii.gz"))) == len(list((workspace.raw / "imagesTs").glob("*_0000.nii.gz")))


def _other_dataset(manifest):
    manifest["data"]["dataset"] = "Dataset999_Other"


def _other_configuration(manifest):
    manifest["data"]["configuration"] = "2d"


def _other_data_identifier(manifest):
    manifest["data"]["data_identifier"] = "nnUNetPlans_2d"


def _other_labels(manifest):
    labels = manifest["data"]["dataset_json"]["labels"]
    labels["tumour"] = labels.pop("lesion")


def _other_plans(manifest):
    manifest["data"]["plans"]["configurations"]["3d_fullres"]["spacing"] = [3.0, 1.0, 1.0]


def _teacher_retrained(manifest):
    manifest["teacher"]["checkpoint_sha256"] = ["0" * 64]


REFUSALS = {
    "dataset": (_other_dataset, "belong to dataset Dataset999_Other"),
    "configuration": (_other_configuration, "written for configuration 2d"),
    "data_identifier": (_other_data_identifier, "preprocessed data nnUNetPlans_2d"),
    "labels": (_other_labels, "labels"),
    "plans": (_other_plans, "target spacing differs"),
    "teacher": (_teacher_retrained, "changed since the targets were written"),
}


@pytest.mark.parametrize("problem", [*sorted(REFUSALS), "missing case", "unknown name"])
def test_unusable_targets_are_refused_before_any_step(workspace, targets_3d, tmp_path, monkeypatch, problem):
    folder = tmp_path / "targets"
    shutil.copytree(targets_3d, folder)
    request = str(folder)
    if problem in REFUSALS:
        edit, message = REFUSALS[problem]
        edit_json(folder / MANIFEST, edit)
    elif problem == "missing case":
        (folder / "case_002.b2nd").unlink()
        message = "have no targets"
    else:
        request, message = "no_such_targets", r"no stored teacher targets there .*available: \['" + targets_3d.name
    trainer = _trainer(workspace, monkeypatch, {"nnUNet_KD_teacher_targets": request}, results=tmp_path / "results")
    with pytest.raises(KDConfigurationError, match=message):
        trainer.on_train_start()
    assert trainer.dataloader_train is None
    written = Path(trainer.output_folder_base)
    assert not any(p.suffix == ".pth" or p.name == "kd_settings.json" for p in written.rglob("*"))


def test_resume_refuses_other_targets(workspace, targets_3d, kd_from_targets, tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(kd_from_targets, results)  # edited below
    fold = results / workspace.preprocessed.name / f"nnUNetTrainerKDLogits_debug__{STUDENT_PLANS}__3d_fullres" / \
        "fold_0"
    other = tmp_path / "other"
    shutil.copytree(targets_3d, other)
    edit_json(other / MANIFEST, lambda m: m["teacher"].update(tile_step_size=0.75))  # other targets, same cases
    record = json.loads((fold / "kd_settings.json").read_text())
    record["teacher_targets"]["folder"] = str(other)
    (fold / "kd_settings.json").write_text(json.dumps(record))
    shutil.copy(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")

    trainer = _trainer(workspace, monkeypatch, {"nnUNet_KD_teacher_targets": targets_3d.name}, results=results)
    trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    with pytest.raises(KDConfigurationError, match="not the targets this training started with"):
        trainer.on_train_start()

    # with the targets it started with (whatever the environment names now) the run continues from them
    record["teacher_targets"]["folder"] = str(targets_3d)
    (fold / "kd_settings.json").write_text(json.dumps(record))
    trainer = _trainer(workspace, monkeypatch, {"nnUNet_KD_teacher_targets": str(other)}, results=results)
    trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    trainer.prepare_distillation()
    assert trainer.stored_targets.folder == targets_3d.resolve() and trainer.teacher is None



def test_bench_step_times_stored_targets_against_online_teachers(workspace, teacher_3d, targets_3d, tmp_path):
    out = tmp_path / "step.json"
    result = workspace.run("nnunet_kd", "bench", "step", str(DATASET_ID), "-p", STUDENT_PLANS, "--trainers",
                           "nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "--teacher", str(teacher_3d),
                           "--teacher-folds", "0", "1", "--teacher-targets", targets_3d.name, "--warmup", "1",
                           "--repeats", "2", "--json", str(out))
    step = json.loads(out.read_text())
    assert step["teacher_folds"] == [0, 1] and step["teacher_targets"] == targets_3d.name
    assert [row["trainer"] for row in step["trainers"]] == [
        "nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "nnUNetTrainerKDLogits [stored targets]"]
    assert set(step["loader_s"]) == {"plain", "stored targets"} and all(v > 0 for v in step["loader_s"].values())
    assert all(row["load_s"] > 0 and np.isfinite(row["load_and_step_ratio"]) for row in step["trainers"])
    assert "load+step ratio" in result.stdout


def test_bench_targets_compares_top_k_with_dense_on_disk_loader_and_kd_loss(workspace, targets_3d, kd_from_targets,
                                                                             tmp_path):
    student = (kd_from_targets / workspace.preprocessed.name
               / f"nnUNetTrainerKDLogits_debug__{STUDENT_PLANS}__3d_fullres")
    out = tmp_path / "targets.json"
    stored_before = sorted(targets_3d.parent.iterdir())
    result = workspace.run("nnunet_kd", "bench", "targets", str(DATASET_ID), "--targets", targets_3d.name,
                           "--student", str(student), "-c", "3d_fullres", "-p", STUDENT_PLANS, "--top-k", "1", "3",
                           "--cases", "2", "--repeats", "1", "--json", str(out))
    bench = json.loads(out.read_text())
    rows = {row["format"]: row for row in bench["rows"]}
    assert list(rows) == ["dense", "top-1", "top-1 even tail", "top-3", "top-3 even tail"]
    assert bench["num_classes"] == 4
    assert rows["dense"]["disk_ratio"] == 1 and all(row["loader_s"] > 0 for row in rows.values())
    assert rows["dense"]["errors"]["soft T=2"]["max_rel_loss_error"] == 0
    # with 4 classes top-3 leaves one class out, whose probability the tail holds exactly: float16 rounding only
    assert rows["top-3"]["errors"]["soft T=2"]["max_rel_loss_error"] < 0.01
    assert rows["top-3 even tail"]["errors"]["soft T=2"]["max_rel_loss_error"] < 0.01
    assert rows["top-1"]["errors"]["soft T=2"]["max_rel_loss_error"] > rows["top-3"]["errors"]["soft T=2"][
        "max_rel_loss_error"]
    # the top-k variants live in a scratch folder: the dataset's stored targets are as they were
    assert "less disk" in result.stdout and sorted(targets_3d.parent.iterdir()) == stored_before


def test_study_refuses_targets_of_another_teacher(workspace, teacher_3d, targets_3d, tmp_path):
    other = copy_model_folder(teacher_3d, workspace.results / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    try:
        refused = workspace.run(
            "nnunet_kd", "study", str(DATASET_ID), "-c", "3d_fullres", "-p", STUDENT_PLANS, "--teacher", str(other),
            "--trainers", "nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "--teacher-targets", targets_3d.name,
            "-o", str(tmp_path / "study"), check=False)
    finally:
        shutil.rmtree(other)
    assert refused.returncode == 2 and f"come from the teacher {teacher_3d}" in refused.stderr
    assert not (tmp_path / "study" / "runs").exists()
