"""The statistics of a paired KD study: per-case Dice of seeds x cases, compared with the no-KD baseline.

Every array here is `dice[seed, case]` (mean foreground Dice of one case in one run). A KD trainer and the baseline
are paired by seed (the same initial weights) and by case, so the quantity of interest is the mean of the per-pair
differences `d[s, c] = kd[s, c] - baseline[s, c]`.

Every run of a study is scored on the same cases, so seeds and cases are *crossed*, not nested:

    d[s, c] = mu + a[s] + b[c] + e[s, c],   a ~ N(0, var_seed), b ~ N(0, var_case), e ~ N(0, var_residual)

and the mean difference over S seeds and C cases has variance var_seed / S + var_case / C + var_residual / (S C).
A case that KD helps helps on every seed (b), and a lucky seed is lucky on every case (a); resampling cases
independently within each seed, or seeds with replacement (with 3 seeds, "the same seed three times" has probability
1/27 per seed), gets both wrong. The two-way ANOVA mean squares estimate the three parts: E[MS_seed] =
var_residual + C var_seed (S - 1 degrees of freedom), E[MS_case] = var_residual + S var_case (C - 1), E[MS_residual]
= var_residual ((S - 1)(C - 1)).

With few seeds the seed part is known to S - 1 degrees of freedom only, and a t interval with Satterthwaite's degrees
of freedom undercovers exactly there (simulated: 91.5 % for a nominal 95 % at 3 seeds when seed and case effects are
alike), because its degrees of freedom grow when MS_seed is small by chance. The interval here is the generalized
(fiducial) confidence interval of the mean (Weerahandi 1993, JASA 88:899; Hannig, Iyer & Patterson 2006, JASA
101:254; for variance components of crossed random models, Burdick & Graybill 1992, "Confidence Intervals on Variance
Components"): each mean square is replaced by its observed value times (degrees of freedom) / chi-square draw,
variance components are kept non-negative, and the mean's pivot `mean - Z sqrt(variance / (S C))` is drawn many
times; its percentiles are the interval. tests/test_study_stats.py checks its coverage on simulated studies (seed,
case and mixed regimes, 3 to 10 seeds, 40 cases). One seed says nothing about the seed part: no interval is given.

The model assumes cases independent of each other. Where they are not, such as the end-diastolic and end-systolic
frames of one ACDC patient, a study's `group_pattern` (as `nnunet_kd prepare --group-pattern` holds a patient's cases
out together) averages each patient's cases first (`group_cases`), so that the case part counts patients.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from nnunet_kd.data.holdout import case_groups

# below this many paired seeds a KD claim is not made (the interval is valid, but wide by necessity)
MIN_SEEDS_FOR_A_CLAIM = 5
INTERVAL_DRAWS = 20000


def _as_matrix(values) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"expected a non-empty seeds x cases matrix, got shape {matrix.shape}")
    return matrix


def group_cases(matrix, cases: list[str], group_pattern: str | None) -> np.ndarray:
    """`matrix[..., case]` averaged over the cases of each group (`case_groups`: the pattern's first capture group,
    matched at the start of the case name), groups in order of first appearance; unchanged without a pattern. A group
    whose every case is NaN stays NaN, and is left out as such a case would be."""
    matrix = np.asarray(matrix, dtype=float)
    if group_pattern is None:
        return matrix
    group_of = case_groups(list(cases), group_pattern)
    groups: dict[str, list[int]] = {}
    for index, case in enumerate(cases):
        groups.setdefault(group_of[case], []).append(index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN group
        return np.stack([np.nanmean(matrix[..., indices], axis=-1) for indices in groups.values()], axis=-1)


def paired_differences(kd, baseline) -> np.ndarray:
    """`kd - baseline` per seed and case; cases that are NaN in either (no foreground to score) drop out later."""
    kd, baseline = _as_matrix(kd), _as_matrix(baseline)
    if kd.shape != baseline.shape:
        raise ValueError(f"KD and baseline must have the same seeds and cases, got {kd.shape} and {baseline.shape}")
    return kd - baseline


def complete_cases(differences) -> tuple[np.ndarray, int]:
    """The cases scored in every seed (a crossed design needs every cell), and how many were dropped."""
    diff = _as_matrix(differences)
    keep = ~np.isnan(diff).any(axis=0)
    return diff[:, keep], int((~keep).sum())


def mean_squares(differences: np.ndarray) -> tuple[np.ndarray, ...]:
    """Grand mean and the two-way ANOVA mean squares (seed, case, residual) of `differences[..., seed, case]`,
    batched over any leading axes."""
    d = np.asarray(differences, dtype=float)
    num_seeds, num_cases = d.shape[-2:]
    mean = d.mean(axis=(-2, -1))
    seed_means, case_means = d.mean(axis=-1), d.mean(axis=-2)
    ms_seed = num_cases * ((seed_means - mean[..., None]) ** 2).sum(-1) / (num_seeds - 1)
    ms_case = num_seeds * ((case_means - mean[..., None]) ** 2).sum(-1) / (num_cases - 1)
    residual = d - seed_means[..., :, None] - case_means[..., None, :] + mean[..., None, None]
    ms_residual = (residual ** 2).sum(axis=(-2, -1)) / ((num_seeds - 1) * (num_cases - 1))
    return mean, ms_seed, ms_case, ms_residual


def generalized_interval(differences: np.ndarray, confidence: float = 0.95, draws: int = INTERVAL_DRAWS,
                         rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of the mean of `differences[..., seed, case]` (complete, at least 2 seeds and 2 cases),
    batched over leading axes: the generalized confidence interval of the module docstring."""
    d = np.asarray(differences, dtype=float)
    num_seeds, num_cases = d.shape[-2:]
    if num_seeds < 2 or num_cases < 2:
        raise ValueError(f"the crossed interval needs at least 2 seeds and 2 cases, got {num_seeds} x {num_cases}")
    rng = rng if rng is not None else np.random.default_rng(0)
    mean, ms_seed, ms_case, ms_residual = mean_squares(d)
    dof = np.array([num_seeds - 1, num_cases - 1, (num_seeds - 1) * (num_cases - 1)])
    shape = (*mean.shape, draws)
    seed_part, case_part, residual_part = (
        ms[..., None] / (rng.chisquare(k, shape) / k) for ms, k in zip((ms_seed, ms_case, ms_residual), dof))
    # E[MS_seed] >= E[MS_residual] and E[MS_case] >= E[MS_residual]: variance components are not negative
    variance = (np.maximum(seed_part, residual_part) + np.maximum(case_part, residual_part) - residual_part) \
        / (num_seeds * num_cases)
    pivot = mean[..., None] - rng.standard_normal(shape) * np.sqrt(variance)
    tail = (1 - confidence) / 2
    low, high = np.quantile(pivot, [tail, 1 - tail], axis=-1)
    return mean, low, high


def crossed_interval(differences, confidence: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """95 % interval of the mean paired difference over seeds x cases; None with one seed (nothing to say about the
    seed-to-seed part) or fewer than 2 cases. Cases not scored in every seed are left out (`complete_cases`)."""
    diff, _ = complete_cases(differences)
    if diff.shape[0] < 2 or diff.shape[1] < 2:
        return None
    _, low, high = generalized_interval(diff, confidence, rng=np.random.default_rng(seed))
    return float(low), float(high)


def wins_losses(differences, tolerance: float = 1e-3) -> tuple[int, int, int]:
    """(seed, case) pairs where KD is better, worse, or within `tolerance` of the baseline."""
    diff = _as_matrix(differences)
    diff = diff[~np.isnan(diff)]
    return int((diff > tolerance).sum()), int((diff < -tolerance).sum()), int((np.abs(diff) <= tolerance).sum())


@dataclass(frozen=True)
class GapClosed:
    """The share of the teacher-student gap that KD closes, `(KD - baseline) / (teacher - baseline)`, given only where
    the gap itself is clearly above zero (its own crossed interval excludes 0); else `share` is None and `reason`
    says why."""

    share: float | None
    teacher_gap: float
    teacher_gap_ci: tuple[float, float] | None
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.share * 100:.0f} %" if self.share is not None else f"n/a ({self.reason})"


def gap_closed(kd, baseline, teacher) -> GapClosed:
    """`teacher` is the teacher's Dice per case (one model), on the same cases as the seeds x cases `kd`/`baseline`."""
    kd, baseline = _as_matrix(kd), _as_matrix(baseline)
    teacher = np.asarray(teacher, dtype=float)
    if teacher.shape != baseline.shape[1:]:
        raise ValueError(f"the teacher needs one Dice per case ({baseline.shape[1]}), got shape {teacher.shape}")
    gap = teacher[None, :] - baseline
    gap_ci = crossed_interval(gap)
    keep = ~(np.isnan(gap).any(axis=0) | np.isnan(kd - baseline).any(axis=0))
    mean_gap = float(np.mean(gap[:, keep])) if keep.any() else float("nan")
    if gap_ci is None:
        return GapClosed(None, mean_gap, None, "one seed: the teacher-baseline gap has no interval")
    if gap_ci[0] <= 0:
        return GapClosed(None, mean_gap, gap_ci, "teacher not clearly better than the baseline")
    return GapClosed(float(np.mean((kd - baseline)[:, keep])) / mean_gap, mean_gap, gap_ci)


@dataclass(frozen=True)
class PairedComparison:
    mean_difference: float
    ci: tuple[float, float] | None  # None with one seed
    per_seed_difference: tuple[float, ...]
    num_cases: int  # scored in every seed of both
    dropped_cases: int  # not scored in some seed (NaN: nothing to find), left out of the mean and the interval
    gap: GapClosed | None
    wins: int
    losses: int
    ties: int

    @property
    def num_seeds(self) -> int:
        return len(self.per_seed_difference)

    @property
    def enough_seeds(self) -> bool:
        return self.num_seeds >= MIN_SEEDS_FOR_A_CLAIM

    @property
    def excludes_zero(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)

    @property
    def claim(self) -> str:
        """What the comparison supports, in words: only with enough seeds and an interval that excludes zero."""
        if not self.enough_seeds:
            return f"no claim ({self.num_seeds} seed{'s' if self.num_seeds != 1 else ''})"
        if not self.excludes_zero:
            return "no difference shown"
        return "KD better" if self.mean_difference > 0 else "KD worse"

    def interval_text(self) -> str:
        return "n/a (one seed)" if self.ci is None else f"[{self.ci[0]:+.4f}, {self.ci[1]:+.4f}]"


def few_seeds_note(num_seeds: int) -> str:
    """The plain line a report prints below MIN_SEEDS_FOR_A_CLAIM seeds."""
    if num_seeds >= MIN_SEEDS_FOR_A_CLAIM:
        return ""
    if num_seeds < 2:
        return ("One seed: a single pair of runs cannot separate KD from the luck of the initial weights, so no "
                "interval is given and no claim is made.")
    return (f"{num_seeds} seeds: the seed-to-seed part of the interval rests on {num_seeds - 1} degree"
            f"{'s' if num_seeds > 2 else ''} of freedom, so the interval is wide by necessity; a claim needs "
            f"{MIN_SEEDS_FOR_A_CLAIM} paired seeds.")


def compare(kd, baseline, teacher=None) -> PairedComparison:
    """KD against the baseline over paired seeds x cases; `teacher`: the teacher's Dice per case, for the gap."""
    diff = paired_differences(kd, baseline)
    complete, dropped = complete_cases(diff)
    wins, losses, ties = wins_losses(diff)
    with np.errstate(all="ignore"):
        per_seed = np.mean(complete, axis=1) if complete.size else np.full(diff.shape[0], np.nan)
    return PairedComparison(
        mean_difference=float(np.mean(complete)) if complete.size else float("nan"),
        ci=crossed_interval(diff), per_seed_difference=tuple(float(d) for d in per_seed),
        num_cases=complete.shape[1], dropped_cases=dropped,
        gap=gap_closed(kd, baseline, teacher) if teacher is not None else None,
        wins=wins, losses=losses, ties=ties)


def still_improving(ema_dice, tail_fraction: float = 0.2, threshold: float = 0.01) -> bool:
    """nnU-Net's EMA pseudo Dice per epoch rose by more than `threshold` over the last `tail_fraction` of the run:
    the run had not converged when it stopped."""
    ema = np.asarray(ema_dice, dtype=float)
    if ema.size < 2:
        return True
    start = min(ema.size - 2, int(np.floor(ema.size * (1 - tail_fraction))))
    return bool(ema[-1] - ema[start] > threshold)
