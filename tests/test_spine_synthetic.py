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


# ---- the two derived nnU-Net datasets ----
def test_stage2_patch_labels_follow_the_memory_rule():
    from nnunet_kd.spine.derive import stage2_patches, target_vertebra
    from nnunet_kd.spine.verse import vertebrae_top_down

    ct, mask, _ = generate_spine_case(np.random.default_rng(0), SpineSpec())
    order = vertebrae_top_down(mask, 0, 1)
    patches = list(stage2_patches(ct, mask, 0, 1, [48, 48, 48], np.random.default_rng(1), jitter=0,
                                  empty_memory=1.0))
    names = [name for name, *_ in patches]
    assert names[0] == f"_v{order[0]:02d}" and names[-1] == "_end"
    assert {f"_v{label:02d}_nomem" for label in order[1:]} <= set(names)
    for name, ct_patch, memory, label in patches:
        assert ct_patch.shape == memory.shape == label.shape == (48, 48, 48)
        if name == "_end":
            assert label.sum() == 0 and memory.sum() > 0, "below the last vertebra there is nothing left to find"
        elif not name.endswith("_nomem"):
            assert label.sum() > 0 and not (label & memory).any()
    # the rule itself: the highest vertebra wholly inside and not in memory
    voxels = {label: int((mask == label).sum()) for label in order}
    assert target_vertebra(mask, np.zeros_like(mask), order, voxels) == order[0]
    assert target_vertebra(mask, np.isin(mask, order[:2]).astype(np.uint8), order, voxels) == order[2]
    assert target_vertebra(mask, (mask > 0).astype(np.uint8), order, voxels) is None


def test_both_datasets_are_written_for_nnunet_with_folds_grouped_by_scan(tmp_path):
    from nnunet_kd.spine.derive import grouped_splits, write_stage1_dataset, write_stage2_dataset
    from nnunet_kd.spine.verse import find_cases

    write_spine_dataset(tmp_path / "verse", 3, SpineSpec(seed=2))
    cases = find_cases(tmp_path / "verse")
    stage1 = tmp_path / "Dataset501_SpineLocation"
    write_stage1_dataset(cases, stage1, spacing=4.0)
    image = sitk.ReadImage(str(stage1 / "imagesTr" / f"{cases[0].name}_0000.nii.gz"))
    label = sitk.ReadImage(str(stage1 / "labelsTr" / f"{cases[0].name}.nii.gz"))
    assert image.GetSpacing() == label.GetSpacing() == (4.0, 4.0, 4.0) and image.GetSize() == (24, 24, 56)
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1}

    stage2 = tmp_path / "Dataset502_SpineVertebrae"
    groups = write_stage2_dataset(cases, stage2, spacing=2.0, patch_mm=96.0, seed=0)
    dataset = json.loads((stage2 / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "noNorm"} and dataset["numTraining"] == sum(
        len(v) for v in groups.values())
    for names in groups.values():
        for name in names:
            assert (stage2 / "imagesTr" / f"{name}_0001.nii.gz").is_file()
    splits = grouped_splits(groups, folds=3)
    for split in splits:
        for names in groups.values():
            assert set(names) <= set(split["train"]) or set(names) <= set(split["val"])
    assert sorted(i for s in splits for i in s["val"]) == sorted(i for v in groups.values() for i in v)


def test_a_mask_on_another_grid_than_its_ct_is_refused(tmp_path):
    import pytest

    from nnunet_kd.core.settings import KDConfigurationError
    from nnunet_kd.spine.verse import find_cases, read_case

    write_spine_dataset(tmp_path, 1, SpineSpec(seed=4))
    case = find_cases(tmp_path)[0]
    mask = sitk.ReadImage(str(case.mask))
    mask.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(mask, str(case.mask))
    with pytest.raises(KDConfigurationError, match="geometry differs from the CT"):
        read_case(case)
    (tmp_path / f"{case.name}_seg-vert_msk.nii.gz").unlink()
    with pytest.raises(KDConfigurationError, match="have no vertebra mask"):
        find_cases(tmp_path)


def test_a_patch_wholly_outside_the_image_is_padding():
    from nnunet_kd.spine.derive import _crop

    array = np.arange(24).reshape(2, 3, 4)
    assert (_crop(array, [-10, 1, 2], [2, 3, 4], -1) == -1).all()
    assert (_crop(array, [1, 1, 2], [2, 3, 4], -1) == array).all()
