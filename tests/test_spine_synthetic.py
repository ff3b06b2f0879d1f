"""The generated spine dataset (issue #13's test and demo data): VerSe layout, numbering and what makes it hard."""
import json

import numpy as np
import SimpleITK as sitk

from nnunet_kd.spine.synthetic import FIRST_LUMBAR, SpineSpec, generate_spine_case, write_spine_dataset


def test_vertebrae_are_numbered_consecutively_from_the_head_down():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ct, mask, centroids = generate_spine_case(rng, SpineSpec())
        labels = sorted(int(v) for v in np.unique(mask) if v)
        assert len(labels) >= 4 and labels == list(range(labels[0], labels[-1] + 1))
        assert sorted(centroids) == labels
        heights = [centroids[label][0] for label in labels]
        assert heights == sorted(heights, reverse=True), "a lower label must lie higher (superior is +z)"
        assert ct.dtype == np.float32 and -1200 < ct.min() and ct.max() < 700


def test_thoracic_vertebrae_have_unlabelled_rib_like_bone_next_to_them():
    rng = np.random.default_rng(3)
    for _ in range(10):
        ct, mask, _ = generate_spine_case(rng, SpineSpec())
        if mask[mask > 0].min() < FIRST_LUMBAR - 2:
            break
    bone_outside_vertebrae = (ct > 250) & (mask == 0)
    assert bone_outside_vertebrae.sum() > 100


def test_dataset_is_written_in_the_verse_layout(tmp_path):
    names = write_spine_dataset(tmp_path, 2, SpineSpec(seed=1))
    for name in names:
        ct = sitk.ReadImage(str(tmp_path / f"{name}_ct.nii.gz"))
        mask = sitk.ReadImage(str(tmp_path / f"{name}_seg-vert_msk.nii.gz"))
        assert ct.GetSize() == mask.GetSize() and ct.GetSpacing() == mask.GetSpacing() == (2.0, 2.0, 2.0)
        entries = json.loads((tmp_path / f"{name}_seg-subreg_ctd.json").read_text())
        labels = set(np.unique(sitk.GetArrayFromImage(mask))) - {0}
        assert entries[0] == {"direction": ["L", "P", "S"]}
        assert {e["label"] for e in entries[1:]} == labels
