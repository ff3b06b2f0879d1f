"""The vertebra search and the per-vertebra scores, with exact stand-ins for the two networks.

The stand-ins read the truth from a "CT" whose intensities carry the labels (label x 1000 + 100), so the search's own
logic (placing patches along the located spine, the memory, numbering, stopping) is what is tested; the nnU-Net
models behind the same interface are trained and run in tests/test_spine_end_to_end.py.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.spine.derive import PATCH_MARGIN_MM, stage2_patches, target_vertebra
from nnunet_kd.spine.evaluate import score_vertebrae
from nnunet_kd.spine.pipeline import SearchSettings, segment_vertebrae, spine_without_stray_parts
from nnunet_kd.spine.synthetic import SpineSpec, generate_spine_case, write_spine_dataset
from nnunet_kd.spine.training import without_head_feet
from nnunet_kd.spine.verse import vertebrae_top_down
from nnunet_kd.tools.cli import main


def _encoded_ct(mask: np.ndarray, spacing: float, flip_axis: int | None = None) -> sitk.Image:
    array = np.where(mask > 0, mask.astype(np.float32) * 1000 + 100, -1000.0).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    return image


def _decoded(ct_patch: np.ndarray) -> np.ndarray:
    """The vertebra labels an encoded CT patch carries (0 elsewhere)."""
    return np.where(ct_patch > 0, np.round((ct_patch - 100) / 1000), 0).astype(int)


def _oracle(mask: np.ndarray):
    order = vertebrae_top_down(mask, 0, 1)
    voxels = {label: int((mask == label).sum()) for label in order}

    def locate(ct, spacing):
        return ct > 0

    def segment(ct_patch, memory_patch, spacing):
        labels = _decoded(ct_patch)
        target = target_vertebra(labels, memory_patch, order, voxels)
        return labels == target if target is not None else np.zeros(labels.shape, bool)

    return locate, segment, order


def _network_like(mask: np.ndarray):
    """Stage 2 as a trained network sees a patch: the highest vertebra is the one nearest the patch's last slice
    along axis 0 (the canonical orientation's head), not the highest in the scan's anatomy."""
    voxels = {label: int((mask == label).sum()) for label in np.unique(mask) if label}

    def segment(ct_patch, memory_patch, spacing):
        labels = _decoded(ct_patch)
        in_patch = vertebrae_top_down(labels, 0, 1)
        target = target_vertebra(labels, memory_patch, in_patch, voxels)
        return labels == target if target is not None else np.zeros(labels.shape, bool)

    return segment


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_finds_every_vertebra_from_the_top_and_stops(seed):
    _, mask, _ = generate_spine_case(np.random.default_rng(seed), SpineSpec())
    locate, segment, order = _oracle(mask)
    lines = []
    result = segment_vertebrae(_encoded_ct(mask, 2.0), locate, segment, SearchSettings(spacing=2.0, patch_mm=96.0),
                               progress=lines.append)
    found = sitk.GetArrayFromImage(result.instances)
    assert [c["label"] for c in result.centroids] == list(range(1, len(order) + 1))
    for number, label in enumerate(order, 1):
        # the search keeps a vertebra's largest connected part: a stray voxel of the generated bone may drop out
        overlap = ((found == number) & (mask == label)).sum()
        assert overlap >= 0.99 * (mask == label).sum() and overlap == (found == number).sum(), (number, label)
    assert lines[0].startswith("stage 1: spine located")
    assert "no further vertebra" in lines[-1] or "passed the lower end" in lines[-1]
    scores = score_vertebrae(mask, found, (2.0, 2.0, 2.0))
    assert scores["detection_rate"] == 1.0 and scores["mean_dice"] > 0.99
    assert scores["merged"] == scores["split"] == scores["missed"] == scores["spurious"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_shows_stage_2_the_next_vertebra_where_training_patches_hold_it(seed):
    """A network learns where in the patch the vertebra to find lies: the search must place it there too (patches
    centred on the vertebra made a trained stage 2 answer the one below it, and the search skip every other one)."""
    spacing, patch_mm, jitter_mm = 2.0, 96.0, 8.0
    patch, jitter = round(patch_mm / spacing), round(jitter_mm / spacing)
    ct, mask, _ = generate_spine_case(np.random.default_rng(seed), SpineSpec())

    def slices_below_patch_top(vertebra: np.ndarray) -> int:
        return patch - 1 - int(np.nonzero(vertebra.any(axis=(1, 2)))[0].max())

    trained = [slices_below_patch_top(label) for name, _, memory, label in
               stage2_patches(ct, mask, 0, 1, [patch] * 3, np.random.default_rng(0), 0, 0.0,
                              round(PATCH_MARGIN_MM / spacing)) if name.startswith("_v") and label.any()]
    locate, exact, _ = _oracle(mask)
    searched = []

    def segment(ct_patch, memory_patch, spacing_zyx):
        found = exact(ct_patch, memory_patch, spacing_zyx)
        if found.any():
            searched.append(slices_below_patch_top(found))
        return found

    segment_vertebrae(_encoded_ct(mask, spacing), locate, segment, SearchSettings(spacing=spacing, patch_mm=patch_mm))
    assert len(searched) >= 3 and len(trained) >= 3
    # training shifts patches by up to the jitter; the search's offsets differ from the unshifted ones by the disc
    assert all(abs(offset - int(np.median(trained))) <= jitter for offset in searched), (searched, trained)


def test_a_ct_without_a_spine_gives_no_vertebrae_and_says_so():
    empty = sitk.GetImageFromArray(np.full((40, 30, 30), -1000.0, np.float32))
    result = segment_vertebrae(empty, lambda ct, s: ct > 0, lambda c, m, s: np.zeros(c.shape, bool),
                               SearchSettings(spacing=1.0, patch_mm=20.0))
    assert sitk.GetArrayFromImage(result.instances).max() == 0 and result.centroids == []
    assert "no spine" in result.log[-1]


def test_scores_count_missed_merged_and_split_vertebrae():
    reference = np.zeros((30, 10, 10), np.uint8)
    for index, label in enumerate((20, 21, 22)):
        reference[index * 10:index * 10 + 8] = label
    prediction = np.zeros_like(reference)
    prediction[0:18] = 1  # merges 20 and 21
    prediction[20:24], prediction[24:28] = 2, 3  # splits 22
    scores = score_vertebrae(reference, prediction, (1.0, 1.0, 1.0))
    assert scores["merged"] == 1 and scores["split"] == 1 and scores["missed"] == 0
    rows = {v["reference_label"]: v for v in scores["vertebrae"]}
    assert rows[22]["split"] and rows[20]["predicted_label"] == 1 and 0 < rows[22]["dice"] < 1
    only_top = np.where(reference == 20, 5, 0).astype(np.uint8)
    scores = score_vertebrae(reference, only_top, (1.0, 1.0, 1.0))
    assert scores["missed"] == 2 and scores["detected"] == 1 and scores["detection_rate"] == pytest.approx(1 / 3)


def test_a_scan_stored_feet_first_and_mirrored_gives_the_same_vertebrae():
    """nnU-Net ignores the image direction: the search must show stage 2 every scan head up, as it was trained."""
    _, mask, _ = generate_spine_case(np.random.default_rng(5), SpineSpec())
    settings = SearchSettings(spacing=2.0)
    upright = segment_vertebrae(_encoded_ct(mask, 2.0), lambda ct, s: ct > 0, _network_like(mask), settings)
    stored = sitk.DICOMOrient(_encoded_ct(mask, 2.0), "RPI")  # the same body, its array flipped head-feet and x
    assert np.array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(_encoded_ct(mask, 2.0))[::-1, :, ::-1])
    result = segment_vertebrae(stored, lambda ct, s: ct > 0, _network_like(mask), settings)
    assert result.instances.GetDirection() == stored.GetDirection()  # on the input's own grid
    assert np.array_equal(sitk.GetArrayFromImage(result.instances)[::-1, :, ::-1],
                          sitk.GetArrayFromImage(upright.instances))
    assert len(result.centroids) == len(upright.centroids) == len(vertebrae_top_down(mask, 0, 1))
    for moved, still in zip(result.centroids, upright.centroids):
        assert moved["physical_xyz_mm"] == pytest.approx(still["physical_xyz_mm"], abs=1e-3)


def test_a_stray_blob_above_the_spine_neither_starts_nor_ends_the_search():
    _, mask, _ = generate_spine_case(np.random.default_rng(1), SpineSpec())
    taller = np.concatenate([mask, np.zeros((60, *mask.shape[1:]), mask.dtype)])  # 120 mm of air above the head
    ct = sitk.GetArrayFromImage(_encoded_ct(taller, 2.0))
    ct[-10:-4, 20:26, 20:26] = 100  # bone-like, no vertebra: stage 1 takes it for spine
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((2.0,) * 3)
    locate, segment, order = _oracle(taller)
    lines = []
    result = segment_vertebrae(image, locate, segment, SearchSettings(spacing=2.0), progress=lines.append)
    assert "ml of stray parts left out" in lines[0]
    assert len(result.centroids) == len(order)
    assert all(c["confidence"] == "high" and not c["after_gap"] for c in result.centroids)
    # a spine located in two long parts keeps both
    split = np.zeros((40, 5, 5), bool)
    split[2:18, 2, 2] = split[22:38, 2, 2] = split[39, 0, 0] = True
    assert spine_without_stray_parts(split, 0.25).sum() == 32


def test_one_level_that_stage_2_misses_does_not_lose_the_spine_below_it():
    _, mask, _ = generate_spine_case(np.random.default_rng(2), SpineSpec())
    locate, exact, order = _oracle(mask)
    calls = []

    def misses_the_third(ct_patch, memory_patch, spacing):
        calls.append(1)
        return np.zeros(ct_patch.shape, bool) if len(calls) == 3 else exact(ct_patch, memory_patch, spacing)

    lines = []
    result = segment_vertebrae(_encoded_ct(mask, 2.0), locate, misses_the_third, SearchSettings(spacing=2.0),
                               progress=lines.append)
    assert len(order) >= 5 and len(result.centroids) >= len(order) - 1
    assert [c["label"] for c in result.centroids] == list(range(1, len(result.centroids) + 1))
    assert [c["after_gap"] for c in result.centroids[:4]] == [False, False, True, False]
    assert [c["confidence"] for c in result.centroids[:4]] == ["high", "high", "low", "high"]
    assert any("one vertebra height" in line for line in lines)
    scores = score_vertebrae(mask, sitk.GetArrayFromImage(result.instances), (2.0, 2.0, 2.0))
    assert scores["detection_rate"] >= (len(order) - 1) / len(order) and scores["spurious"] == 0


def test_stage_2_mirrors_along_every_axis_but_head_feet_wherever_the_plans_put_it():
    assert without_head_feet((0, 1, 2), [0, 1, 2]) == (1, 2)
    assert without_head_feet((0, 1, 2), [2, 0, 1]) == (0, 2)  # the scans' axis 0 is the preprocessed axis 1
    assert without_head_feet(None, [0, 1, 2]) is None


def test_a_network_that_answers_everything_cannot_crash_or_stall_the_search():
    _, mask, _ = generate_spine_case(np.random.default_rng(6), SpineSpec())
    settings = SearchSettings(spacing=2.0, patch_mm=96.0)
    result = segment_vertebrae(_encoded_ct(mask, 2.0), lambda ct, s: ct > 0,
                               lambda ct_patch, memory, s: np.ones(ct_patch.shape, bool), settings)
    found = sitk.GetArrayFromImage(result.instances)
    tops = [np.nonzero((found == c["label"]).any(axis=(1, 2)))[0].max() for c in result.centroids]
    assert tops == sorted(tops, reverse=True) and len(tops) < settings.max_vertebrae


def _relabelled_predictions(verse: Path, folder: Path, merge_first_two: bool) -> None:
    """Each reference mask as a prediction with its own numbering (1, 2, ... from the top); optionally the two top
    vertebrae as one."""
    folder.mkdir()
    for mask_path in sorted(verse.glob("*_seg-vert_msk.nii.gz")):
        mask = sitk.ReadImage(str(mask_path))
        array = sitk.GetArrayFromImage(mask)
        order = vertebrae_top_down(array, 0, 1)
        renumbered = np.zeros_like(array)
        for number, label in enumerate(order, start=1):
            renumbered[array == label] = 1 if merge_first_two and number == 2 else number
        prediction = sitk.GetImageFromArray(renumbered)
        prediction.CopyInformation(mask)
        sitk.WriteImage(prediction, str(folder / mask_path.name.replace("_seg-vert_msk", "")))


def test_the_table_scores_each_run_against_the_reference(tmp_path, capsys):
    verse = tmp_path / "verse"
    write_spine_dataset(verse, 2, SpineSpec(seed=4))
    _relabelled_predictions(verse, tmp_path / "exact", merge_first_two=False)
    _relabelled_predictions(verse, tmp_path / "merged", merge_first_two=True)
    total = sum(len(vertebrae_top_down(sitk.GetArrayFromImage(sitk.ReadImage(str(m))), 0, 1))
                for m in verse.glob("*_seg-vert_msk.nii.gz"))
    assert main(["spine", "table", str(verse), f"exact={tmp_path / 'exact'}", f"merged={tmp_path / 'merged'}",
                 "--seconds", "exact=10", "--json", str(tmp_path / "table.json")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["exact"][2:9] == ["1.000", "0.0", f"{total} / {total} (100%)", "0", "0", "0", "0"]
    assert rows["exact"][9].strip(" |") == "5.0"  # 10 s over 2 scans
    # the two top vertebrae of each scan become one prediction, which each of them matches with Dice < 1
    assert rows["merged"][7] == "2" and rows["merged"][9].strip(" |") == "-"
    summaries = json.loads((tmp_path / "table.json").read_text())["summaries"]
    assert summaries["merged"]["merged"] == 2 and summaries["merged"]["mean_dice"] < 1


def test_the_table_refuses_a_run_without_a_name_and_seconds_of_no_run(tmp_path, capsys):
    verse = tmp_path / "verse"
    write_spine_dataset(verse, 1, SpineSpec(seed=4))
    assert main(["spine", "table", str(verse), str(tmp_path)]) == 2
    assert "write NAME=VALUE" in capsys.readouterr().err
    assert main(["spine", "table", str(verse), f"a={tmp_path}", "--seconds", "b=3"]) == 2
    assert "not among the runs" in capsys.readouterr().err
