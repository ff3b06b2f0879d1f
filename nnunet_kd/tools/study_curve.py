"""`nnunet_kd study-curve`: Dice against student size, with and without KD, from one study per size.

Each study (`nnunet_kd study`, or its published copy) is one student size: the plain student and KD trainers on the
same seeds. For every study and trainer the curve gives the mean Dice over seeds and cases (the test set, or the
validation fold) with the crossed seeds x cases interval of `nnunet_kd.tools.study_stats` (the same model, for a mean
instead of a difference), the same for one class (e.g. ACDC's myocardium, where a small network loses first), and
each KD trainer's paired difference from the plain student of its study. The teacher as the students learned from it
(each study's teacher row) and any other model (`--line NAME=summary.json`, an nnU-Net evaluation) are horizontal
lines. Parameters are counted from the checkpoints (`models.json` in a published copy).

Cases that are not independent, such as the end-diastolic and end-systolic frames of one ACDC patient, are averaged
per group first (`group_pattern`, as `nnunet_kd prepare --group-pattern` holds them out together; by default the
studies' own, `nnunet_kd study --group-pattern`), so that the case part of an interval counts patients, not frames.
Overlapping intervals of the plain and KD points of one size do not mean "no difference": the paired difference (Δ)
is the comparison; the points' intervals carry the case-to-case spread that pairing removes.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.tools.results import CaseScores, read_summary
from nnunet_kd.tools.study import StudyPlan
from nnunet_kd.tools.study_report import SPLITS, TrainerResult, _paired, load_study, model_sizes
from nnunet_kd.tools.study_stats import compare, complete_cases, crossed_interval, group_cases

CURVE_CSV, CURVE_MARKDOWN, CURVE_FIGURE = "curve.csv", "curve.md", "curve.png"


@dataclass(frozen=True)
class CurvePoint:
    """One trainer of one study: its size and Dice, and (KD trainers) its paired difference from the baseline."""

    study: str
    model: str
    parameters: int
    seeds: int
    dice: float
    dice_ci: tuple[float, float] | None
    class_dice: float | None = None
    class_ci: tuple[float, float] | None = None
    delta: float | None = None  # KD minus the study's baseline, paired by seed and case
    delta_ci: tuple[float, float] | None = None
    claim: str = ""


@dataclass(frozen=True)
class ReferenceLine:
    """A single model's Dice on the same cases (the teacher, the 5-fold ensemble): a horizontal line."""

    name: str
    dice: float
    class_dice: float | None
    parameters: int | None = None


def mean_with_interval(dice: np.ndarray) -> tuple[float, tuple[float, float] | None]:
    """Mean over seeds x cases (cases scored in every seed) and its crossed interval (None with one seed)."""
    complete, _ = complete_cases(dice)
    return float(np.mean(complete)), crossed_interval(dice)


def _class_index(scores: CaseScores, class_name: str, what: str) -> int:
    if class_name not in scores.classes:
        raise KDConfigurationError(f"--class {class_name}: {what} has the classes {scores.classes}.")
    return scores.classes.index(class_name)


def study_points(name: str, plan: StudyPlan, results: dict[str, TrainerResult], sizes: dict[str, int], split: str,
                 class_name: str | None = None, group_pattern: str | None = None) -> list[CurvePoint]:
    """The curve's points of one study: every trainer with scores on `split`."""
    baseline = results[plan.trainers[0]]
    points = []
    for trainer, result in results.items():
        per_seed = [result.scores[split][s] for s in sorted(result.scores.get(split, {}))]
        if not per_seed:
            continue
        cases = per_seed[0].cases
        dice = group_cases(np.stack([s.mean_per_case for s in per_seed]), cases, group_pattern)
        mean, ci = mean_with_interval(dice)
        class_mean = class_ci = None
        if class_name is not None:
            k = _class_index(per_seed[0], class_name, name)
            class_mean, class_ci = mean_with_interval(
                group_cases(np.stack([s.dice[:, k] for s in per_seed]), cases, group_pattern))
        delta = delta_ci = None
        claim = ""
        if trainer != plan.trainers[0]:
            kd, base, seeds = _paired(baseline, result, split)
            if seeds:
                paired = compare(group_cases(kd, cases, group_pattern), group_cases(base, cases, group_pattern))
                delta, delta_ci, claim = paired.mean_difference, paired.ci, paired.claim
        points.append(CurvePoint(name, trainer, sizes[trainer], dice.shape[0], mean, ci, class_mean, class_ci,
                                 delta, delta_ci, claim))
    return points


def reference_from_scores(name: str, scores: CaseScores, class_name: str | None, parameters: int | None = None,
                          group_pattern: str | None = None) -> ReferenceLine:
    """One model's mean Dice (and the class's) on the cases, averaged per group first as the points are."""
    with np.errstate(all="ignore"):
        dice = float(np.nanmean(group_cases(scores.mean_per_case, scores.cases, group_pattern)))
        class_dice = None if class_name is None else float(np.nanmean(group_cases(
            scores.dice[:, _class_index(scores, class_name, name)], scores.cases, group_pattern)))
    return ReferenceLine(name, dice, class_dice, parameters)


def _interval(ci: tuple[float, float] | None) -> str:
    return "n/a (one seed)" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_markdown(points: list[CurvePoint], lines: list[ReferenceLine], split: str, class_name: str | None,
                    fold: int = 0, group_pattern: str | None = None) -> str:
    """The curve's table, smallest student first, and its horizontal lines."""
    cases = SPLITS[split].format(fold=fold)
    header = ["study", "model", "parameters", "seeds", "mean Dice", "95 % CI"]
    header += [f"{class_name} Dice", "95 % CI"] if class_name else []
    header += ["Δ vs plain", "95 % CI", "claim"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in sorted(points, key=lambda p: (p.parameters, p.study)):  # stable: plain first, as the study lists
        cells = [p.study, p.model, f"{p.parameters:,}", str(p.seeds), f"{p.dice:.3f}", _interval(p.dice_ci)]
        if class_name:
            cells += [f"{p.class_dice:.3f}", _interval(p.class_ci)]
        cells += ([f"{p.delta:+.4f}", "n/a (one seed)" if p.delta_ci is None else
                   f"[{p.delta_ci[0]:+.4f}, {p.delta_ci[1]:+.4f}]", p.claim] if p.delta is not None else ["", "", ""])
        rows.append("| " + " | ".join(cells) + " |")
    references = [f"- {r.name}: mean Dice {r.dice:.3f}" + (f", {class_name} {r.class_dice:.3f}" if class_name and
                                                             r.class_dice is not None else "")
                  + (f" ({r.parameters:,} parameters per network)" if r.parameters else "") for r in lines]
    unit = f"case groups (`{group_pattern}`: cases averaged per group first)" if group_pattern else "cases"
    return "\n".join([f"## Dice against student size, {cases}", "",
                      f"Mean over seeds and {unit}; 95 % CI: seeds and {unit.split(' (')[0]} crossed "
                      "(`nnunet_kd/tools/study_stats.py`). Δ vs plain: the KD trainer minus its study's plain "
                      "student, paired by seed and case; it is the comparison (the points' intervals carry the "
                      "case-to-case spread that pairing removes, so they overlap where Δ is clear).", "",
                      *rows, "", "Horizontal lines:", *references, ""])


def write_csv(path: Path, points: list[CurvePoint]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "model", "parameters", "seeds", "dice", "dice_low", "dice_high", "class_dice",
                         "class_low", "class_high", "delta", "delta_low", "delta_high", "claim"])
        for p in points:
            def cells(value, ci):
                return ["" if value is None else f"{value:.6f}", *(["", ""] if ci is None else
                                                                     [f"{ci[0]:.6f}", f"{ci[1]:.6f}"])]
            writer.writerow([p.study, p.model, p.parameters, p.seeds, *cells(p.dice, p.dice_ci),
                             *cells(p.class_dice, p.class_ci), *cells(p.delta, p.delta_ci), p.claim])


def plot(path: Path, points: list[CurvePoint], lines: list[ReferenceLine], split: str,
         class_name: str | None) -> None:
    """Dice against parameters (log scale), one curve per trainer with its intervals, references as lines; a second
    panel for the class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mean Dice", "dice", "dice_ci")] + ([(f"{class_name} Dice", "class_dice", "class_ci")]
                                                   if class_name else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10")
    models = list(dict.fromkeys(p.model for p in points))
    for ax, (label, value, interval) in zip(axes[0], panels):
        for k, model in enumerate(models):
            mine = sorted((p for p in points if p.model == model), key=lambda p: p.parameters)
            x = np.array([p.parameters for p in mine], dtype=float) * (1 + 0.03 * k)  # side by side, not on top
            y = np.array([getattr(p, value) for p in mine])
            cis = [getattr(p, interval) for p in mine]
            errors = np.array([[y[i] - ci[0], ci[1] - y[i]] if ci else [0, 0] for i, ci in enumerate(cis)]).T
            ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, color=colours(k % 10),
                        label=model.replace("nnUNetTrainer", "") or model)
        for k, line in enumerate(lines):
            y = line.dice if value == "dice" else line.class_dice
            if y is not None:
                ax.axhline(y, color="black", ls=["--", ":", "-."][k % 3], lw=0.9, label=line.name)
        ax.set_xscale("log")
        ax.set(xlabel="student parameters", ylabel=f"{label} ({SPLITS[split].split(' (')[0]})", title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _teacher_name(sizes: dict, split: str, fold: int) -> str:
    """The teacher row as what it is: on the test set the teacher the students learned from (an ensemble, mirrored or
    not), on the validation fold that fold's network."""
    learned = sizes.get("teacher_as_learned")
    if split != "test" or not learned:
        return f"teacher, fold {fold}"
    folds = learned["folds"]
    return ("teacher, " + (f"{len(folds)}-fold ensemble" if len(folds) > 1 else f"fold {folds[0]}")
            + (", mirrored" if learned["mirroring"] else ", no mirroring"))


def study_curve(studies: list[Path], output: Path, split: str = "test", class_name: str | None = None,
                extra_lines: dict[str, Path] | None = None, group_pattern: str | None = None) -> Path:
    """curve.csv, curve.md and curve.png of the studies (one student size each) in `output`. Every study and line is
    scored on the same cases (refused otherwise)."""
    names = [source.name for source in studies]
    if len(set(names)) != len(names):
        raise KDConfigurationError(f"Two studies share a folder name ({names}): the curve names its points by it; "
                                   f"give folders of different names.")
    loaded = [(source, *load_study(source)) for source in studies]
    if group_pattern is None:
        patterns = {plan.group_pattern for _, plan, _, _ in loaded}
        if len(patterns) > 1:
            raise KDConfigurationError(f"The studies group their cases differently ({sorted(map(str, patterns))}): "
                                       f"give one --group-pattern for the curve.")
        group_pattern = patterns.pop()
    points: list[CurvePoint] = []
    lines: dict[str, ReferenceLine] = {}
    cases = fold = None
    for source, plan, results, teacher in loaded:
        if split not in teacher:
            raise KDConfigurationError(f"{source} has no {split} scores: run its study with --test-images and "
                                       f"--test-labels, or give --split validation.")
        if cases is not None and (teacher[split].cases, plan.fold) != (cases, fold):
            raise KDConfigurationError(f"{source} was scored on other {split} cases than {studies[0]}: a curve "
                                       f"compares studies of one dataset, fold and test set.")
        cases, fold = teacher[split].cases, plan.fold
        sizes = model_sizes(plan, source, results)
        points += study_points(source.name, plan, results, sizes["parameters"], split, class_name, group_pattern)
        name = _teacher_name(sizes, split, plan.fold)
        line = reference_from_scores(name, teacher[split], class_name, sizes["parameters"].get("teacher"),
                                     group_pattern)
        if name in lines and abs(lines[name].dice - line.dice) > 1e-9:  # another teacher: a line of its own
            line = ReferenceLine(f"{name} ({source.name})", line.dice, line.class_dice, line.parameters)
        lines.setdefault(line.name, line)
    for name, summary in (extra_lines or {}).items():
        # nnUNetv2_predict writes the dataset.json that names the summary's classes into the same folder
        dataset_json = Path(summary).parent / "dataset.json"
        if not dataset_json.is_file():
            raise KDConfigurationError(f"--line {name}={summary}: no dataset.json beside it; give the summary.json "
                                       f"of an nnUNetv2_predict output folder.")
        scores = read_summary(Path(summary), json.loads(dataset_json.read_text())["labels"])
        if scores.cases != cases or name in lines:
            raise KDConfigurationError(f"--line {name}={summary}: " + (
                "the name is taken by a line of the studies" if name in lines else
                f"scored on {len(scores.cases)} other cases than the studies' {len(cases)} {split} cases"))
        lines[name] = reference_from_scores(name, scores, class_name, group_pattern=group_pattern)
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / CURVE_CSV, points)
    markdown = format_markdown(points, list(lines.values()), split, class_name, fold, group_pattern)
    (output / CURVE_MARKDOWN).write_text(markdown)
    plot(output / CURVE_FIGURE, points, list(lines.values()), split, class_name)
    print(markdown, flush=True)
    return output / CURVE_MARKDOWN
