"""The study's statistics on numbers worked out by hand."""
import numpy as np
import pytest

from nnunet_kd.tools.study_stats import (
    compare,
    gap_closed,
    hierarchical_bootstrap_ci,
    paired_differences,
    still_improving,
    wins_losses,
)


def test_paired_differences_are_kd_minus_baseline_per_seed_and_case():
    kd = [[0.8, 0.6], [0.5, 0.9]]
    baseline = [[0.7, 0.7], [0.5, 0.6]]
    np.testing.assert_allclose(paired_differences(kd, baseline), [[0.1, -0.1], [0.0, 0.3]])
    with pytest.raises(ValueError, match="same seeds and cases"):
        paired_differences([[0.1, 0.2]], [[0.1]])


def test_wins_losses_ties_count_pairs_beyond_the_tolerance():
    # +0.1 wins, -0.1 loses, 0.0 and +0.0005 tie, NaN (no foreground in either) is left out
    assert wins_losses([[0.1, -0.1], [0.0, 0.0005], [np.nan, 0.2]]) == (2, 1, 2)


def test_gap_closed():
    # baseline 0.70, teacher 0.80, KD 0.75: half of the 0.10 gap
    assert gap_closed(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_closed(0.65, 0.70, 0.80) == pytest.approx(-0.5)
    assert gap_closed(0.75, 0.80, 0.80) is None  # no gap to close


def test_bootstrap_of_a_constant_difference_is_that_constant():
    low, high = hierarchical_bootstrap_ci(np.full((3, 5), 0.02), num_resamples=200)
    assert low == pytest.approx(0.02) and high == pytest.approx(0.02)


def test_bootstrap_over_cases_of_one_seed():
    # cases with differences 0 and 1: a resample of two cases has mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so the
    # 2.5th percentile is 0 and the 97.5th is 1
    low, high = hierarchical_bootstrap_ci([[0.0, 1.0]], num_resamples=20000)
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_resamples_seeds_not_only_cases():
    # seed A: KD changes nothing on any case; seed B: +1 on every case. Resampling cases alone would give the point
    # 0.5; resampling the two seeds gives AA (mean 0, p 1/4), AB or BA (0.5, p 1/2), BB (1, p 1/4): interval [0, 1]
    low, high = hierarchical_bootstrap_ci([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], num_resamples=20000)
    assert (low, high) == (0.0, 1.0)


def test_compare_summarises_one_kd_trainer_against_the_baseline():
    kd = [[0.8, 0.7], [0.6, 0.7]]
    baseline = [[0.7, 0.7], [0.6, 0.5]]
    result = compare(kd, baseline, teacher_mean=0.9, num_resamples=2000)
    # differences [[0.1, 0], [0, 0.2]]: mean 0.075; per seed 0.05 and 0.1
    assert result.mean_difference == pytest.approx(0.075)
    assert result.per_seed_difference == pytest.approx((0.05, 0.1))
    # KD mean 0.7, baseline 0.625, teacher 0.9: (0.7 - 0.625) / (0.9 - 0.625) = 0.2727
    assert result.gap_closed == pytest.approx(0.075 / 0.275)
    assert (result.wins, result.losses, result.ties) == (2, 0, 2)
    assert 0 <= result.ci_low <= 0.075 <= result.ci_high <= 0.2
    assert result.significant == (result.ci_low > 0)


def test_still_improving_looks_at_the_last_fifth_of_the_epochs():
    flat = [0.0, 0.5, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.905]  # epochs 8 -> 9: +0.005
    rising = flat[:-1] + [0.95]  # +0.05
    assert not still_improving(flat)
    assert still_improving(rising)
    assert still_improving([0.3])  # one epoch says nothing about convergence


def test_demo_puts_kd_difference_next_to_its_interval():
    from nnunet_kd.tools.demo import kd_effect_note

    plain = {"mean_dice": 0.6, "case_mean_dice": [0.5, 0.7]}
    kd = {"mean_dice": 0.7, "case_mean_dice": [0.6, 0.8]}
    note = kd_effect_note(plain, kd, {"mean_dice": 0.8})
    assert "+0.100 mean Dice, 50% of the teacher-student gap" in note
    assert "95 % CI over the 2 held-out cases [+0.100, +0.100]" in note and "nnunet_kd study" in note


def test_demo_reads_per_case_mean_dice_from_nnunet_metrics():
    from nnunet_kd.tools.demo import _case_mean_dice

    metrics = {"metric_per_case": [
        {"reference_file": "/l/case_2.nii.gz", "metrics": {"1": {"Dice": 0.5}, "2": {"Dice": float("nan")}}},
        {"reference_file": "/l/case_1.nii.gz", "metrics": {"1": {"Dice": 0.2}, "2": {"Dice": 0.4}}}]}
    assert _case_mean_dice(metrics) == pytest.approx([0.3, 0.5])  # sorted by case; NaN (nothing to find) left out
