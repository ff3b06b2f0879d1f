"""Fewer-modality students on a dataset whose channels nnU-Net normalises inside the non-zero mask: the loader carries
every channel, so nnU-Net's augmentation must mask the dataset's channels, not the student's (shorter) list."""
from __future__ import annotations

import json

import pytest
from conftest import Workspace, _clean_environment

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
    ws.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2")
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
