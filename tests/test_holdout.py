"""`nnunet_kd holdout`: a labelled test set outside every cross-validation fold, in a dataset nnU-Net accepts."""
from __future__ import annotations

import json

import pytest
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.data.holdout import case_groups, grouped_splits, write_grouped_splits, write_holdout_dataset
from nnunet_kd.data.synthetic import SyntheticSpec, write_dataset
from nnunet_kd.data.synthetic_multimodal import write_multimodal_dataset
from nnunet_kd.tools.cli import main

SMALL = SyntheticSpec(shape=(8, 12, 12), num_training=10, num_test=2)


@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    write_multimodal_dataset(tmp_path, 910, spec=SMALL)
    return tmp_path


def _cases(folder, ending=".nii.gz"):
    return sorted(p.name[:-len(ending)] for p in folder.glob(f"*{ending}"))


def test_held_out_cases_leave_training_and_keep_every_channel_and_label(raw, capsys):
    assert main(["holdout", "910", "--test-cases", "3", "--dataset-id", "911"]) == 0
    assert "7 training cases" in capsys.readouterr().out
    source, held_out = raw / "Dataset910_KDSyntheticMultiModal", raw / "Dataset911_KDSyntheticMultiModalHoldout3"
    training, test = _cases(held_out / "labelsTr"), _cases(held_out / "labelsTs")
    assert len(test) == 3 and len(training) == 7 and not set(test) & set(training)
    assert sorted(training + test) == _cases(source / "labelsTr")  # the source's unlabelled imagesTs are not copied
    for images, cases in (("imagesTr", training), ("imagesTs", test)):
        assert _cases(held_out / images) == sorted(f"{c}_{i:04d}" for c in cases for i in range(4))
        for name in _cases(held_out / images):
            assert (held_out / images / f"{name}.nii.gz").read_bytes() == \
                (source / "imagesTr" / f"{name}.nii.gz").read_bytes()
    dataset_json = json.loads((held_out / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 7 and dataset_json["held_out_test_cases"] == test
    verify_dataset_integrity(str(held_out), num_processes=1)  # nnU-Net plans it as it is


def test_the_draw_is_seeded(tmp_path):
    source = write_dataset(tmp_path / "raw", 900, spec=SMALL)
    first = write_holdout_dataset(source, tmp_path / "a" / "Dataset901_A", 4, seed=1)
    again = write_holdout_dataset(source, tmp_path / "b" / "Dataset901_A", 4, seed=1)
    other = write_holdout_dataset(source, tmp_path / "c" / "Dataset901_A", 4, seed=2)
    assert first == again and first["test"] != other["test"]


@pytest.mark.parametrize("test_cases, message", [(0, "hold out at least 1"), (10, "has 10 labelled cases")])
def test_impossible_counts_are_refused(raw, test_cases, message):
    with pytest.raises(KDConfigurationError, match=message):
        write_holdout_dataset(raw / "Dataset910_KDSyntheticMultiModal", raw / "Dataset912_X", test_cases)
    assert not (raw / "Dataset912_X").exists()


def test_an_id_in_use_is_refused_and_nothing_is_written(raw, capsys):
    (raw / "Dataset911_Other").mkdir()
    assert main(["holdout", "910", "--test-cases", "2", "--dataset-id", "911", "--name", "New"]) == 2
    assert "Dataset911_Other exists" in capsys.readouterr().err
    assert not (raw / "Dataset911_New").exists() and not any((raw / "Dataset911_Other").iterdir())


# ---- cases of one patient (ACDC: two cardiac phases per heart) ----
PATIENT = r"(patient\d+)_"


def _acdc_like(tmp_path, patients: int = 6):
    """The generated dataset with its cases renamed patientNNN_frame01 / _frame02, two per patient."""
    source = write_dataset(tmp_path / "raw", 900, spec=SyntheticSpec(shape=(8, 12, 12), num_training=2 * patients,
                                                                      num_test=1))
    for index in range(2 * patients):
        new = f"patient{index // 2:03d}_frame{index % 2 + 1:02d}"
        (source / "labelsTr" / f"case_{index:03d}.nii.gz").rename(source / "labelsTr" / f"{new}.nii.gz")
        (source / "imagesTr" / f"case_{index:03d}_0000.nii.gz").rename(source / "imagesTr" / f"{new}_0000.nii.gz")
    return source


def test_a_patient_is_held_out_whole(tmp_path, monkeypatch, capsys):
    source = _acdc_like(tmp_path)
    monkeypatch.setenv("nnUNet_raw", str(source.parent))
    assert main(["holdout", "900", "--test-cases", "3", "--dataset-id", "901", "--group-pattern", PATIENT]) == 0
    held_out = source.parent / "Dataset901_KDSyntheticHoldout3"
    test, training = _cases(held_out / "labelsTs"), _cases(held_out / "labelsTr")
    assert len(test) == 4 and len(training) == 8  # two whole patients: at least the 3 cases asked for
    assert not {c.split("_")[0] for c in test} & {c.split("_")[0] for c in training}
    dataset_json = json.loads((held_out / "dataset.json").read_text())
    assert dataset_json["held_out_groups"] == sorted({c.split("_")[0] for c in test})
    verify_dataset_integrity(str(held_out), num_processes=1)


def test_folds_keep_a_patient_together_and_validate_every_case_once():
    cases = [f"patient{p:03d}_frame{f:02d}" for p in range(12) for f in (1, 12)]
    splits = grouped_splits(cases, PATIENT)
    assert len(splits) == 5 and splits == grouped_splits(cases, PATIENT)  # seeded, as nnU-Net's own split
    assert sorted(c for split in splits for c in split["val"]) == sorted(cases)
    for split in splits:
        assert sorted(split["train"] + split["val"]) == sorted(cases)
        assert not {c[:10] for c in split["train"]} & {c[:10] for c in split["val"]}


def test_grouped_splits_are_written_once_and_other_folds_are_refused(tmp_path):
    cases = [f"patient{p:03d}_frame{f:02d}" for p in range(10) for f in (1, 2)]
    path = write_grouped_splits(tmp_path, cases, PATIENT)
    assert json.loads(path.read_text()) == grouped_splits(cases, PATIENT)
    assert write_grouped_splits(tmp_path, cases, PATIENT) == path  # the same folds: kept
    path.write_text(json.dumps(grouped_splits(cases, None)))  # as nnU-Net writes it: by case
    with pytest.raises(KDConfigurationError, match="exists with other folds"):
        write_grouped_splits(tmp_path, cases, PATIENT)


@pytest.mark.parametrize("pattern, message", [("patient\\d+_", "no capture group"), (r"(case_\d+)", "does not match")])
def test_a_pattern_that_cannot_group_every_case_is_refused(pattern, message):
    with pytest.raises(KDConfigurationError, match=message):
        case_groups(["patient001_frame01", "patient001_frame02"], pattern)
