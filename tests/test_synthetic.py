"""Unit tests for the generated demo/test dataset (small volumes so they run in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.data.synthetic import CHANNEL_NAMES, LABELS, SyntheticSpec, generate_case, write_dataset

SMALL = SyntheticSpec(shape=(24, 32, 32))


def _cases(spec: SyntheticSpec, seed: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [generate_case(rng, spec) for _ in range(n)]


def test_generate_case_shapes_and_dtypes() -> None:
    image, seg = generate_case(np.random.default_rng(0), SMALL)
    assert image.shape == seg.shape == (24, 32, 32)
    assert image.dtype == np.float32 and seg.dtype == np.uint8
    assert np.isfinite(image).all()


def test_generate_case_is_deterministic_for_a_seed() -> None:
    for (image_a, seg_a), (image_b, seg_b) in zip(_cases(SMALL, 3, 2), _cases(SMALL, 3, 2)):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(seg_a, seg_b)


def test_generate_case_differs_between_seeds_and_cases() -> None:
    (image_0, seg_0), (image_1, seg_1) = _cases(SMALL, 0, 2)
    other_image, other_seg = _cases(SMALL, 1, 1)[0]
    assert not np.array_equal(image_0, other_image) and not np.array_equal(seg_0, other_seg)
    assert not np.array_equal(image_0, image_1) and not np.array_equal(seg_0, seg_1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_case_holds_every_label(seed) -> None:
    for _, seg in _cases(SMALL, seed, 4):
        assert set(np.unique(seg)) == set(LABELS.values()) == {0, 1, 2, 3}


def test_every_case_holds_every_label_at_default_size() -> None:
    for _, seg in _cases(SyntheticSpec(), 0, 2):
        assert set(np.unique(seg)) == {0, 1, 2, 3}


def test_structures_differ_in_size_and_contrast() -> None:
    # background dominates, the organ is the largest structure, lesion/vessel are brighter than the organ on average
    for image, seg in _cases(SMALL, 0, 4):
        counts = np.bincount(seg.ravel(), minlength=4)
        assert counts[0] > counts[1] > max(counts[2], counts[3])
        means = [image[seg == label].mean() for label in range(4)]
        assert means[0] < means[1] < means[2]
        assert means[1] < means[3]


def test_lesions_lie_inside_the_organ() -> None:
    # every lesion voxel has at least one organ or lesion neighbour: lesions are carved out of the organ
    for _, seg in _cases(SMALL, 0, 3):
        lesion = seg == LABELS["lesion"]
        near_organ = np.zeros_like(lesion)
        body = np.isin(seg, (LABELS["organ"], LABELS["lesion"]))
        for axis in range(3):
            for shift in (-1, 1):
                near_organ |= np.roll(body, shift, axis=axis)
        assert near_organ[lesion].all()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    spec = SyntheticSpec(shape=(16, 24, 28), spacing=(2.0, 1.0, 0.75), num_training=3, num_test=2, seed=5)
    folder = write_dataset(tmp_path_factory.mktemp("raw"), dataset_id=42, name="Tiny", spec=spec)
    return spec, folder


def test_write_dataset_layout_and_counts(written) -> None:
    spec, folder = written
    assert folder.name == "Dataset042_Tiny"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == \
        [f"case_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"case_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == \
        [f"case_{i:03d}_0000.nii.gz" for i in range(3, 5)]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"case_{i:03d}.nii.gz" for i in range(3, 5)]


def test_write_dataset_dataset_json(written) -> None:
    spec, folder = written
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == CHANNEL_NAMES == {"0": "MR"}
    assert dataset_json["labels"] == LABELS
    assert dataset_json["numTraining"] == spec.num_training == 3
    assert dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["name"] == "Tiny"


def test_write_dataset_images_have_spacing_and_size_of_spec(written) -> None:
    spec, folder = written
    for image_path in sorted((folder / "imagesTr").iterdir()) + sorted((folder / "imagesTs").iterdir()):
        split = image_path.parent.name.replace("images", "labels")
        label_path = folder / split / image_path.name.replace("_0000.nii.gz", ".nii.gz")
        image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        # SimpleITK reports (x, y, z); the spec is (z, y, x)
        assert image.GetSpacing() == pytest.approx(spec.spacing[::-1])
        assert label.GetSpacing() == pytest.approx(spec.spacing[::-1])
        assert image.GetSize() == label.GetSize() == spec.shape[::-1]
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetDirection() == label.GetDirection()


def test_write_dataset_labels_are_integers_with_known_values(written) -> None:
    _, folder = written
    for path in sorted((folder / "labelsTr").iterdir()):
        label = sitk.ReadImage(str(path))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1, 2, 3}


def test_write_dataset_writes_the_generated_cases_in_order(written) -> None:
    spec, folder = written
    for i, (image, seg) in enumerate(_cases(spec, spec.seed, spec.num_training + spec.num_test)):
        split = "Tr" if i < spec.num_training else "Ts"
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"images{split}" / f"case_{i:03d}_0000.nii.gz"))),
            image)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"labels{split}" / f"case_{i:03d}.nii.gz"))), seg)


def test_write_dataset_passes_nnunet_case_checks(written) -> None:
    # the per-case checks of nnU-Net's verify_dataset_integrity, run in-process (it would spawn a worker pool)
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    spec, folder = written
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    assert sorted(dataset) == [f"case_{i:03d}" for i in range(spec.num_training)]
    first_image = next(iter(dataset.values()))["images"][0]
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, first_image)
    for case in dataset.values():
        assert verify_labels(case["label"], reader_writer, [0, 1, 2, 3])
        assert check_cases(case["images"], case["label"], len(dataset_json["channel_names"]), reader_writer)
