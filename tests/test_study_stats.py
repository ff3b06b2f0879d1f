"""The study's statistics: numbers worked out by hand, and the interval's coverage on simulated studies."""
import numpy as np
import pytest

from nnunet_kd.tools.study_stats import (
    compare,
    crossed_interval,
    few_seeds_note,
    gap_closed,
    generalized_interval,
    group_cases,
    mean_squares,
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


def test_mean_squares_of_a_two_by_two_table():
    # d = [[1, 3], [5, 7]]: mean 4; seed means 2, 6; case means 3, 5; no interaction
    mean, ms_seed, ms_case, ms_residual = mean_squares(np.array([[1.0, 3.0], [5.0, 7.0]]))
    # MS_seed = C * sum((seed mean - mean)^2) / (S - 1) = 2 * (4 + 4) / 1; MS_case = 2 * (1 + 1) / 1
    assert (mean, ms_seed, ms_case, ms_residual) == pytest.approx((4.0, 16.0, 4.0, 0.0))


def test_interval_of_a_constant_difference_is_that_constant():
    low, high = crossed_interval(np.full((3, 5), 0.02))
    assert low == pytest.approx(0.02) and high == pytest.approx(0.02)


def test_one_seed_gives_no_interval():
    # the old bootstrap gave [+0.100, +0.100] here: cases alone say nothing about another seed
    assert crossed_interval([[0.1, 0.1, 0.1]]) is None


def test_two_seeds_that_disagree_give_an_interval_wider_than_both():
    # seed A: KD changes nothing; seed B: +1 on every case. One degree of freedom for the seed part: the interval
    # reaches well beyond both seeds' means (a bootstrap over the two seeds stopped at [0, 1])
    low, high = crossed_interval([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert low < -1 and high > 2


def test_seeds_and_cases_are_crossed_not_nested():
    # a case effect that every seed shares (the same cases are hard for KD in every run) does not average out over
    # seeds: ten identical seeds give the same interval as two
    rng = np.random.default_rng(1)
    case_effect = rng.normal(0.01, 0.05, 40)
    two, ten = crossed_interval(np.tile(case_effect, (2, 1))), crossed_interval(np.tile(case_effect, (10, 1)))
    assert two == pytest.approx(ten, abs=1e-3)
    assert two[1] - two[0] > 2 * 1.9 * case_effect.std(ddof=1) / np.sqrt(40) * 0.9


def test_cases_not_scored_in_every_seed_are_left_out():
    kd = [[0.8, np.nan, 0.6], [0.7, 0.5, 0.6]]
    base = [[0.7, 0.6, 0.5], [0.6, 0.4, 0.5]]
    result = compare(kd, base)
    assert (result.num_cases, result.dropped_cases) == (2, 1)
    assert result.mean_difference == pytest.approx(0.1)
    assert result.ci == pytest.approx((0.1, 0.1))


def test_cases_of_one_patient_are_averaged_in_order_and_a_patient_never_scored_drops_out():
    cases = ["p02_ed", "p01_ed", "p02_es", "p01_es", "p03_ed", "p03_es"]
    kd = [[0.8, 0.6, 0.6, 0.4, np.nan, np.nan], [0.9, 0.7, 0.7, 0.5, np.nan, np.nan]]
    grouped = group_cases(kd, cases, r"(p\d+)_")
    np.testing.assert_allclose(grouped[:, :2], [[0.7, 0.5], [0.8, 0.6]])  # p02 first: first seen
    assert np.isnan(grouped[:, 2]).all()
    result = compare(grouped, np.zeros_like(grouped))
    assert (result.num_cases, result.dropped_cases) == (2, 1)
    assert np.array_equal(group_cases(kd, cases, None), kd, equal_nan=True)


@pytest.mark.parametrize("regime, sd_seed, sd_case, sd_residual", [
    ("seed effect dominant", 0.03, 0.005, 0.01),
    ("case effect dominant", 0.002, 0.03, 0.01),
    ("mixed", 0.02, 0.02, 0.01),
])
def test_interval_covers_the_true_difference_in_95_percent_of_simulated_studies(regime, sd_seed, sd_case,
                                                                                sd_residual):
    # d[s, c] = true difference + seed effect + case effect + noise, 40 cases, 1,000 studies per seed count
    rng = np.random.default_rng(2026)
    studies, cases, truth = 1000, 40, 0.01
    widths = []
    for seeds in (3, 5, 10):
        d = (truth + rng.normal(0, sd_seed, (studies, seeds, 1)) + rng.normal(0, sd_case, (studies, 1, cases))
             + rng.normal(0, sd_residual, (studies, seeds, cases)))
        _, low, high = generalized_interval(d, draws=2000, rng=rng)
        coverage = np.mean((low <= truth) & (truth <= high))
        assert coverage >= 0.93, f"{regime}, {seeds} seeds: coverage {coverage:.3f}"
        widths.append(float(np.mean(high - low)))
    assert widths[0] > widths[1] > widths[2], f"{regime}: widths {widths} do not shrink as seeds grow"


def test_gap_closed_needs_a_teacher_clearly_better_than_the_baseline():
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.75, 0.95, 40)
    baseline = teacher - 0.10 + rng.normal(0, 0.01, (3, 40))
    kd = baseline + 0.05
    result = gap_closed(kd, baseline, teacher)
    assert result.share == pytest.approx(0.5, abs=0.02) and result.teacher_gap_ci[0] > 0
    assert str(result) == f"{result.share * 100:.0f} %"
    # teacher 0.861 against a baseline of 0.859 (the converged Hippocampus study): a ratio of -156 % was printed
    close = teacher - 0.002 + rng.normal(0, 0.02, (3, 40))
    result = gap_closed(close - 0.004, close, teacher)
    assert result.share is None and str(result) == "n/a (teacher not clearly better than the baseline)"
    assert gap_closed([[0.7, 0.8]], [[0.6, 0.7]], [0.9, 0.9]).share is None  # one seed


def test_compare_summarises_one_kd_trainer_against_the_baseline():
    kd = [[0.8, 0.7, 0.9], [0.6, 0.7, 0.6]]
    baseline = [[0.7, 0.7, 0.8], [0.6, 0.5, 0.5]]
    result = compare(kd, baseline, teacher=[0.95, 0.9, 0.95])
    # differences [[0.1, 0, 0.1], [0, 0.2, 0.1]]: mean 0.0833; per seed 0.0667 and 0.1
    assert result.mean_difference == pytest.approx(0.5 / 6)
    assert result.per_seed_difference == pytest.approx((0.2 / 3, 0.1))
    assert (result.wins, result.losses, result.ties) == (4, 0, 2)
    assert result.ci[0] < result.mean_difference < result.ci[1]
    assert result.claim == "no claim (2 seeds)" and not result.enough_seeds


def test_a_claim_needs_five_seeds_and_an_interval_that_excludes_zero():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.7, 0.9, (5, 30))
    assert compare(base + 0.05 + rng.normal(0, 0.005, (5, 30)), base).claim == "KD better"
    assert compare(base - 0.05 + rng.normal(0, 0.005, (5, 30)), base).claim == "KD worse"
    assert compare(base + rng.normal(0, 0.005, (5, 30)), base).claim == "no difference shown"
    assert compare(base[:3] + 0.05, base[:3]).claim == "no claim (3 seeds)"


def test_few_seeds_note():
    assert "wide by necessity" in few_seeds_note(3) and "5 paired seeds" in few_seeds_note(3)
    assert "no interval" in few_seeds_note(1)
    assert few_seeds_note(5) == ""


def test_still_improving_looks_at_the_last_fifth_of_the_epochs():
    flat = [0.0, 0.5, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.905]  # epochs 8 -> 9: +0.005
    rising = flat[:-1] + [0.95]  # +0.05
    assert not still_improving(flat)
    assert still_improving(rising)
    assert still_improving([0.3])  # one epoch says nothing about convergence


def test_demo_gives_one_seed_no_interval_and_points_to_the_study():
    from nnunet_kd.tools.demo import kd_effect_note

    plain = {"mean_dice": 0.6, "case_mean_dice": [0.5, 0.7]}
    kd = {"mean_dice": 0.7, "case_mean_dice": [0.6, 0.8]}
    note = kd_effect_note(plain, kd)
    assert "KD student - plain student: +0.100 mean Dice on the 2 held-out cases" in note
    assert "CI" not in note and "no interval" in note and "nnunet_kd study" in note


def test_per_case_mean_dice_is_read_from_nnunets_summary(tmp_path):
    import json

    from nnunet_kd.tools.results import read_summary

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"mean": {"1": {"Dice": 0.35}, "2": {"Dice": 0.4}}, "metric_per_case": [
        {"reference_file": "/l/case_2.nii.gz", "metrics": {"1": {"Dice": 0.5}, "2": {"Dice": float("nan")}}},
        {"reference_file": "/l/case_1.nii.gz", "metrics": {"1": {"Dice": 0.2}, "2": {"Dice": 0.4}}}]}))
    scores = read_summary(path, {"background": 0, "a": 1, "b": 2})
    assert scores.mean_per_case == pytest.approx([0.3, 0.5])  # sorted by case; NaN (nothing to find) left out
