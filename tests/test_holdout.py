"""`nnunet_kd holdout`: a labelled test set outside every cross-validation fold, in a dataset nnU-Net accepts."""
from __future__ import annotations

import json

import pytest
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.data.holdout import write_holdout_dataset
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
