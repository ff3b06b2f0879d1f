"""Lesion scores (nnunet_kd.evaluation.lesions) on masks whose answers are known by hand; `nnunet_kd study-lesions`
on a real study's test-set predictions is in test_study_end_to_end.py."""
import math

import numpy as np
import pytest

from nnunet_kd.evaluation.lesions import lesion_scores
from nnunet_kd.evaluation.surface import hd95

SPACING = (3.0, 2.0, 2.0)  # z, y, x in mm: the LGG data's nominal spacing


def _cube(shape, z, y, x, size):
    mask = np.zeros(shape, bool)
    mask[z:z + size, y:y + size, x:x + size] = True
    return mask


def test_false_positives_count_only_on_slices_without_the_lesion():
    reference = _cube((10, 20, 20), 2, 5, 5, 4)  # slices 2-5
    prediction = reference.copy()
    prediction[3, 15:17, 15:17] = True  # beside the lesion on a lesion slice: costs Dice, not an FP slice
    prediction[8, 0:3, 0:2] = True  # 6 voxels on lesion-free slice 8
    prediction[9, 10, 10] = True  # 1 voxel on lesion-free slice 9
    scores = lesion_scores(reference, prediction, SPACING)
    voxel_ml = 3 * 2 * 2 / 1000
    assert scores["fp_ml_lesion_free_slices"] == pytest.approx(7 * voxel_ml)
    assert (scores["lesion_free_slices_with_fp"], scores["lesion_free_slices"]) == (2, 6)
    assert scores["dice"] == pytest.approx(2 * 64 / (64 + 64 + 4 + 7))
    assert scores["reference_ml"] == pytest.approx(64 * voxel_ml)
    assert scores["predicted_ml"] == pytest.approx(75 * voxel_ml)
    assert scores["missed"] == scores["false_alarm"] == 0


def test_hd95_of_a_shifted_cube_is_the_shift_in_mm():
    reference = _cube((12, 30, 30), 3, 10, 10, 6)
    shifted = _cube((12, 30, 30), 3, 10, 13, 6)  # 3 voxels of 2 mm along x
    assert hd95(reference, shifted, SPACING) == pytest.approx(6.0)
    assert hd95(reference, reference, SPACING) == 0.0


def test_empty_masks_give_undefined_distances_and_name_the_miss_or_the_false_alarm():
    lesion, nothing = _cube((6, 10, 10), 1, 1, 1, 3), np.zeros((6, 10, 10), bool)
    missed = lesion_scores(lesion, nothing, SPACING)
    assert missed["missed"] == 1 and missed["dice"] == 0 and math.isnan(missed["hd95_mm"])
    alarm = lesion_scores(nothing, lesion, SPACING)
    assert alarm["false_alarm"] == 1 and alarm["lesion_free_slices_with_fp"] == 3 and math.isnan(alarm["hd95_mm"])
    both_empty = lesion_scores(nothing, nothing, SPACING)
    assert math.isnan(both_empty["dice"]) and both_empty["fp_ml_lesion_free_slices"] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_scores(lesion, lesion[:-1], SPACING)

