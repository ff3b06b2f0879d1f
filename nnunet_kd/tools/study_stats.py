"""The statistics of a paired KD study: per-case Dice of seeds x cases, compared with the no-KD baseline.

Every array here is `dice[seed, case]` (mean foreground Dice of one case in one run). A KD trainer and the baseline
are paired by seed (the same initial weights) and by case, so the quantity of interest is the per-pair difference
`kd[s, c] - baseline[s, c]`. Its uncertainty comes from two sources: which seeds were drawn (runs vary a lot) and
which cases were drawn. The bootstrap resamples both: seeds with replacement, then cases with replacement within each
drawn seed (a two-level, or hierarchical, bootstrap), so a 95 % interval reflects the seed-to-seed spread as well as
the case-to-case one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_matrix(values) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"expected a non-empty seeds x cases matrix, got shape {matrix.shape}")
    return matrix


def paired_differences(kd, baseline) -> np.ndarray:
    """`kd - baseline` per seed and case; cases that are NaN in either (no foreground to score) drop out later."""
    kd, baseline = _as_matrix(kd), _as_matrix(baseline)
    if kd.shape != baseline.shape:
        raise ValueError(f"KD and baseline must have the same seeds and cases, got {kd.shape} and {baseline.shape}")
    return kd - baseline


def hierarchical_bootstrap_ci(differences, num_resamples: int = 10000, confidence: float = 0.95,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean difference, resampling seeds, then cases within each drawn seed."""
    diff = _as_matrix(differences)
    num_seeds, num_cases = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(num_seeds, size=(num_resamples, num_seeds))
    cases = rng.integers(num_cases, size=(num_resamples, num_seeds, num_cases))
    means = np.nanmean(diff[seeds[:, :, None], cases], axis=(1, 2))
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return float(low), float(high)


def gap_closed(kd_mean: float, baseline_mean: float, teacher_mean: float) -> float | None:
    """The share of the teacher-student gap that KD closes; None where the baseline is not below the teacher."""
    gap = teacher_mean - baseline_mean
    return (kd_mean - baseline_mean) / gap if gap > 0 else None


def wins_losses(differences, tolerance: float = 1e-3) -> tuple[int, int, int]:
    """(seed, case) pairs where KD is better, worse, or within `tolerance` of the baseline."""
    diff = _as_matrix(differences)
    diff = diff[~np.isnan(diff)]
    return int((diff > tolerance).sum()), int((diff < -tolerance).sum()), int((np.abs(diff) <= tolerance).sum())


@dataclass(frozen=True)
class PairedComparison:
    mean_difference: float
    ci_low: float
    ci_high: float
    per_seed_difference: tuple[float, ...]
    gap_closed: float | None
    wins: int
    losses: int
    ties: int

    @property
    def significant(self) -> bool:
        """Whether the 95 % interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0


def compare(kd, baseline, teacher_mean: float | None, num_resamples: int = 10000, seed: int = 0) -> PairedComparison:
    diff = paired_differences(kd, baseline)
    low, high = hierarchical_bootstrap_ci(diff, num_resamples, seed=seed)
    wins, losses, ties = wins_losses(diff)
    kd_mean, baseline_mean = float(np.nanmean(kd)), float(np.nanmean(baseline))
    return PairedComparison(
        mean_difference=float(np.nanmean(diff)), ci_low=low, ci_high=high,
        per_seed_difference=tuple(float(d) for d in np.nanmean(diff, axis=1)),
        gap_closed=gap_closed(kd_mean, baseline_mean, teacher_mean) if teacher_mean is not None else None,
        wins=wins, losses=losses, ties=ties)


def still_improving(ema_dice, tail_fraction: float = 0.2, threshold: float = 0.01) -> bool:
    """nnU-Net's EMA pseudo Dice per epoch rose by more than `threshold` over the last `tail_fraction` of the run:
    the run had not converged when it stopped."""
    ema = np.asarray(ema_dice, dtype=float)
    if ema.size < 2:
        return True
    start = min(ema.size - 2, int(np.floor(ema.size * (1 - tail_fraction))))
    return bool(ema[-1] - ema[start] > threshold)
