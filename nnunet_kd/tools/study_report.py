"""The report of a `nnunet_kd study`: Markdown, CSV and a PNG, from nnU-Net's own per-case evaluation files.

Dice comes from nnU-Net's `summary.json` files (the final validation of the fold, and the test-set evaluation); a
case's "mean Dice" is the mean of its foreground classes' Dice, like nnU-Net's `foreground_mean`. The statistics are
in `nnunet_kd.tools.study_stats`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_kd.errors import KDConfigurationError
from nnunet_kd.tools.study import PAIRING_FIELDS, TEST_TEACHER_FILE, Run, StudyPlan, load_plan, plan_runs
from nnunet_kd.tools.study_stats import PairedComparison, compare, still_improving

SPLITS = {"validation": "validation (fold {fold})", "test": "test set"}


@dataclass
class CaseScores:
    """Dice per case and class of one model on one split; `classes` are dataset.json's label names."""

    cases: list[str]
    classes: list[str]
    dice: np.ndarray  # cases x classes

    @property
    def mean_per_case(self) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.nanmean(self.dice, axis=1)


def read_summary(path: Path, labels: dict) -> CaseScores:
    """nnU-Net's summary.json as a cases x classes Dice matrix, cases sorted by name."""
    summary = json.loads(path.read_text())
    names = {str(tuple(v) if isinstance(v, list) else v): name for name, v in labels.items()}
    keys = list(summary["mean"])
    rows = []
    for entry in summary["metric_per_case"]:
        case = Path(entry["reference_file"]).name.split(".")[0]
        rows.append((case, [entry["metrics"][k]["Dice"] for k in keys]))
    rows.sort()
    return CaseScores([c for c, _ in rows], [names.get(k, k) for k in keys],
                      np.array([d for _, d in rows], dtype=float).reshape(len(rows), len(keys)))


@dataclass
class TrainerResult:
    trainer: str
    seeds: list[int] = field(default_factory=list)
    scores: dict[str, list[CaseScores]] = field(default_factory=dict)  # split -> one per seed, in `seeds` order
    improving: list[bool] = field(default_factory=list)  # per seed: still improving when it stopped
    final_ema: list[float] = field(default_factory=list)


def _run_logging(run: Run) -> dict:
    from nnunet_kd.checkpoints import load_checkpoint

    return load_checkpoint(run.fold_folder / "checkpoint_final.pth").get("logging", {})


def collect(plan: StudyPlan, study: Path) -> tuple[dict[str, TrainerResult], dict[str, CaseScores], dict]:
    """Per trainer its finished seeds' scores; the teacher's scores per split; dataset.json's labels."""
    teacher = Path(plan.teacher)
    labels = json.loads((teacher / "dataset.json").read_text())["labels"]
    teacher_scores = {"validation": read_summary(teacher / f"fold_{plan.fold}" / "validation" / "summary.json", labels)}
    if (study / "predictions" / "teacher" / "summary.json").is_file():
        teacher_scores["test"] = read_summary(study / "predictions" / "teacher" / "summary.json", labels)
    results = {t: TrainerResult(t) for t in plan.trainers}
    for run in plan_runs(plan, study):
        if not run.trained:
            continue
        result = results[run.trainer]
        result.seeds.append(run.seed)
        result.scores.setdefault("validation", []).append(read_summary(run.validation_summary, labels))
        if plan.test_images is not None and run.tested:
            result.scores.setdefault("test", []).append(read_summary(run.test_predictions / "summary.json", labels))
        ema = _run_logging(run).get("ema_fg_dice", [])
        result.improving.append(still_improving(ema))
        result.final_ema.append(float(ema[-1]) if ema else float("nan"))
    return results, teacher_scores, labels


def _paired(baseline: TrainerResult, other: TrainerResult, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """seeds x cases mean Dice of both, on the seeds both finished."""
    seeds = [s for s in other.seeds if s in baseline.seeds]
    if split not in baseline.scores or split not in other.scores:
        return np.empty((0, 0)), np.empty((0, 0)), []
    pick = {s: i for i, s in enumerate(baseline.seeds)}
    mine = {s: i for i, s in enumerate(other.seeds)}
    seeds = [s for s in seeds if mine[s] < len(other.scores[split]) and pick[s] < len(baseline.scores[split])]
    if not seeds:
        return np.empty((0, 0)), np.empty((0, 0)), []
    base = np.stack([baseline.scores[split][pick[s]].mean_per_case for s in seeds])
    kd = np.stack([other.scores[split][mine[s]].mean_per_case for s in seeds])
    return kd, base, seeds


def comparisons(results: dict[str, TrainerResult], teacher: dict[str, CaseScores], baseline: str,
                num_resamples: int = 10000) -> dict[str, dict[str, tuple[PairedComparison, list[int]]]]:
    """split -> KD trainer -> (its comparison with the baseline, the seeds compared)."""
    out: dict[str, dict[str, tuple[PairedComparison, list[int]]]] = {}
    for split in SPLITS:
        for name, result in results.items():
            if name == baseline:
                continue
            kd, base, seeds = _paired(results[baseline], result, split)
            if not seeds:
                continue
            teacher_mean = float(np.nanmean(teacher[split].mean_per_case)) if split in teacher else None
            out.setdefault(split, {})[name] = (compare(kd, base, teacher_mean, num_resamples), seeds)
    return out


def _model_costs(plan: StudyPlan, study: Path, results: dict[str, TrainerResult], time_cases: int) -> list[dict]:
    """Parameters, FLOPs per patch and CPU seconds per validation case of the teacher and each trainer's first seed,
    timed side by side (interleaved per case) in this process."""
    import torch

    from nnunet_kd.tools.bench import load_predictor, network_costs, validation_cases

    folders = [("teacher", Path(plan.teacher))]
    for name, result in results.items():
        if result.seeds:
            folders.append((name, Run(result.seeds[0], name, study, plan).model_folder))
    device = torch.device("cpu")
    predictors = [load_predictor(str(folder), (plan.fold,), device) for _, folder in folders]
    cases = validation_cases(folders[-1][1], plan.fold, predictors[-1], time_cases)
    rows = []
    for (name, folder), costs in zip(folders, network_costs(predictors, cases, device)):
        rows.append({"model": name, "folder": str(folder), "parameters": costs["parameters"],
                     "gflops_per_patch": costs["flops_per_patch"] / 1e9,
                     "cpu_seconds_per_case": costs["seconds_per_case"]})
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _gap(gap_closed: float | None) -> str:
    # no gap to close where the teacher is not better than the baseline
    return "n/a" if gap_closed is None or not np.isfinite(gap_closed) else f"{gap_closed * 100:.0f} %"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def study_machines(study: Path) -> list[str]:
    path = study / "machines.txt"
    return sorted({line.split(" ", 2)[2] for line in path.read_text().splitlines() if line.count(" ") >= 2}) \
        if path.is_file() else []


def _test_teacher_note(study: Path, fold: int) -> str:
    record = study / "predictions" / "teacher" / TEST_TEACHER_FILE
    if not record.is_file():
        return ""
    teacher = json.loads(record.read_text())
    if teacher["folds"] == [fold] and teacher["mirroring"]:
        return ""
    folds = ", ".join(str(f) for f in teacher["folds"])
    return (f" On the test set the teacher row is the teacher as the students learned from it: "
            f"fold{'s' if len(teacher['folds']) > 1 else ''} {folds}"
            f"{' (ensemble)' if len(teacher['folds']) > 1 else ''}, {'with' if teacher['mirroring'] else 'without'} "
            f"mirroring; on the validation fold it is fold {fold}'s network alone.")


def format_markdown(plan: StudyPlan, study: Path, results: dict[str, TrainerResult], teacher: dict[str, CaseScores],
                    compared: dict, costs: list[dict]) -> str:
    baseline = plan.trainers[0]
    classes = teacher["validation"].classes
    schedule = (f"named schedule `{plan.schedule}`" if plan.schedule else
                f"{plan.num_epochs or 'default'} epochs x {plan.iterations_per_epoch or 'default'} iterations")
    lines = [f"# KD study: {plan.dataset}, {plan.configuration}, student plans `{plan.plans}`", "",
             f"Teacher `{Path(plan.teacher).name}`; baseline (no KD) `{baseline}`; seeds {list(plan.seeds)}; "
             f"{schedule}; fold {plan.fold}; device {plan.device}. Each seed starts every trainer from the same "
             f"initial student weights." + (f" KD trainers learn from the stored teacher targets "
                                             f"`{Path(plan.teacher_targets).name}` (`nnunet_kd teacher-targets`)."
                                             if plan.teacher_targets else "")
             + _test_teacher_note(study, plan.fold), ""]
    machines = study_machines(study)
    if machines:
        lines += ["Trained on: " + "; ".join(machines), ""]
    for split, title in SPLITS.items():
        if split not in teacher:
            continue
        title = title.format(fold=plan.fold)
        n_cases = len(teacher[split].cases)
        lines += [f"## Dice, {title}: {n_cases} cases", "",
                  "Mean ± standard deviation over seeds of each seed's mean over cases.", "",
                  "| model | seeds | " + " | ".join(classes) + " | mean Dice |",
                  "|---|---|" + "---|" * (len(classes) + 1)]
        t = teacher[split]
        lines.append("| teacher | - | " + " | ".join(_fmt(float(np.nanmean(t.dice[:, k]))) for k in range(len(classes)))
                     + f" | {_fmt(float(np.nanmean(t.mean_per_case)))} |")
        for name, result in results.items():
            scores = result.scores.get(split, [])
            if not scores:
                continue
            per_class = [_mean_sd([float(np.nanmean(s.dice[:, k])) for s in scores]) for k in range(len(classes))]
            mean = _mean_sd([float(np.nanmean(s.mean_per_case)) for s in scores])
            lines.append(f"| {name}{' (baseline)' if name == baseline else ''} | {len(scores)} | "
                         + " | ".join(per_class) + f" | {mean} |")
        lines.append("")
        if split in compared:
            lines += [f"### KD against the baseline, {title}", "",
                      "Paired by seed and case. CI: 95 % hierarchical bootstrap (seeds, then cases within seeds). "
                      "Gap closed: (KD − baseline) / (teacher − baseline) on mean Dice. Won / lost: (seed, case) "
                      "pairs where KD's Dice is higher / lower by more than 0.001."
                      + (f" With {n_seeds} seeds the bootstrap can draw only a few distinct seed sets, so the "
                         f"interval is approximate: read it together with the per-seed differences."
                         if (n_seeds := max(len(seeds) for _, seeds in compared[split].values())) < 5 else ""), "",
                      "| trainer | seeds | Δ mean Dice | 95 % CI | per seed Δ | gap closed | won / lost / tied |",
                      "|---|---|---|---|---|---|---|"]
            for name, (c, seeds) in compared[split].items():
                verdict = " **(CI excludes 0)**" if c.significant else ""
                lines.append(f"| {name} | {len(seeds)} | {c.mean_difference:+.4f}{verdict} | "
                             f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] | "
                             + ", ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, c.per_seed_difference))
                             + f" | {_gap(c.gap_closed)} | "
                             f"{c.wins} / {c.losses} / {c.ties} |")
            lines.append("")
    lines += ["## Every run", "",
              "Validation mean Dice per seed. *still improving*: nnU-Net's EMA pseudo Dice rose by more than 0.01 over "
              "the last 20 % of the epochs, so the run had not converged; *X not learned*: class X has Dice below 0.05 "
              "where the teacher's is above.", "",
              "| trainer | " + " | ".join(f"seed {s}" for s in plan.seeds) + " |",
              "|---|" + "---|" * len(plan.seeds)]
    for name, result in results.items():
        cells = []
        for seed in plan.seeds:
            if seed not in result.seeds:
                cells.append("not run yet")
                continue
            i = result.seeds.index(seed)
            scores = result.scores["validation"][i]
            value = float(np.nanmean(scores.mean_per_case))
            # a class the teacher finds but this run never learned (nnU-Net's all-background start, not left)
            missed = [c for k, c in enumerate(scores.classes)
                      if np.nanmean(scores.dice[:, k]) < 0.05 <= np.nanmean(teacher["validation"].dice[:, k])]
            flags = (" *still improving*" if result.improving[i] else "") + \
                (f" *{', '.join(missed)} not learned*" if missed else "")
            cells.append(f"{value:.3f}{flags}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if costs:
        teacher_row = costs[0]
        lines += ["## Size and speed", "",
                  "CPU seconds per validation case: nnUNetPredictor's sliding window with mirroring on preprocessed "
                  "data, median, models timed side by side in one process (read the ratios).", "",
                  "| model | parameters | rel. size | GFLOPs/patch | CPU s/case | speed-up |",
                  "|---|---|---|---|---|---|"]
        for row in costs:
            speed = (teacher_row["cpu_seconds_per_case"] / row["cpu_seconds_per_case"]
                     if row["cpu_seconds_per_case"] and teacher_row["cpu_seconds_per_case"] else None)
            relative = row["parameters"] / teacher_row["parameters"]
            lines.append(f"| {row['model']} | {row['parameters']:,} | {relative:.3f}"
                         f" | {row['gflops_per_patch']:.3f} | {_fmt(row['cpu_seconds_per_case'])} | "
                         f"{_fmt(speed, 2)} |")
        lines.append("")
    lines += ["![per-case Dice](study.png)", ""]
    return "\n".join(lines)


def write_csv(path: Path, results: dict[str, TrainerResult], teacher: dict[str, CaseScores]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        classes = teacher["validation"].classes
        writer.writerow(["split", "model", "seed", "case", *[f"dice_{c}" for c in classes], "mean_dice"])
        for split, scores in teacher.items():
            for case, row, mean in zip(scores.cases, scores.dice, scores.mean_per_case):
                writer.writerow([split, "teacher", "", case, *[f"{v:.6f}" for v in row], f"{mean:.6f}"])
        for name, result in results.items():
            for split, per_seed in result.scores.items():
                for seed, scores in zip(result.seeds, per_seed):
                    for case, row, mean in zip(scores.cases, scores.dice, scores.mean_per_case):
                        writer.writerow([split, name, seed, case, *[f"{v:.6f}" for v in row], f"{mean:.6f}"])


def plot(path: Path, plan: StudyPlan, results: dict[str, TrainerResult], teacher: dict[str, CaseScores]) -> None:
    """Per KD trainer: per-case validation Dice against the baseline's (one colour per seed); last panel: every seed's
    mean Dice per trainer, with the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = results[plan.trainers[0]]
    others = [r for name, r in results.items() if name != plan.trainers[0] and r.seeds]
    fig, axes = plt.subplots(1, len(others) + 1, figsize=(4 * (len(others) + 1), 4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, result in zip(axes[0], others):
        kd, base, seeds = _paired(baseline, result, "validation")
        for k, seed in enumerate(seeds):
            ax.scatter(base[k], kd[k], s=10, alpha=0.7, color=colours(k % 10), label=f"seed {seed}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"{plan.trainers[0]} Dice", ylabel=f"{result.trainer} Dice",
               title="per case (validation)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    per_seed: dict[int, list[tuple[int, float]]] = {}
    for x, result in enumerate(results.values()):
        for seed, scores in zip(result.seeds, result.scores.get("validation", [])):
            per_seed.setdefault(seed, []).append((x, float(np.nanmean(scores.mean_per_case))))
    for k, (seed, points) in enumerate(sorted(per_seed.items())):  # a line joins the runs of one seed
        ax.plot(*zip(*points), marker="o", color=colours(k % 10), lw=0.8, label=f"seed {seed}")
    ax.axhline(float(np.nanmean(teacher["validation"].mean_per_case)), color="black", ls="--", lw=0.8,
               label="teacher")
    ax.set_xticks(range(len(results)), [n.replace("nnUNetTrainer", "") or n for n in results], rotation=30,
                  ha="right", fontsize=7)
    ax.set(ylabel="mean Dice (validation)", title="spread over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(plan: StudyPlan, study: Path, time_cases: int = 3, num_resamples: int = 10000) -> Path:
    results, teacher, _ = collect(plan, study)
    compared = comparisons(results, teacher, plan.trainers[0], num_resamples)
    costs = _model_costs(plan, study, results, time_cases) if time_cases > 0 else []
    markdown = format_markdown(plan, study, results, teacher, compared, costs)
    (study / "report.md").write_text(markdown)
    write_csv(study / "per_case_dice.csv", results, teacher)
    summary = {split: {name: {"seeds": seeds, "mean_difference": c.mean_difference, "ci95": [c.ci_low, c.ci_high],
                              "per_seed_difference": list(c.per_seed_difference), "gap_closed": c.gap_closed,
                              "won_lost_tied": [c.wins, c.losses, c.ties]}
                       for name, (c, seeds) in by_trainer.items()}
               for split, by_trainer in compared.items()}
    (study / "comparison.json").write_text(json.dumps({"plan": plan.to_json(), "comparisons": summary,
                                                       "costs": costs}, indent=2))
    plot(study / "study.png", plan, results, teacher)
    print(markdown, flush=True)
    return study / "report.md"


def compare_studies(reference: Path, other: Path, trainers: list[str] | None = None,
                    num_resamples: int = 10000) -> str:
    """The same trainers in two studies that differ in one setting (e.g. online vs stored-target KD), paired by seed
    (the same initial weights) and case: other minus reference, with the hierarchical bootstrap interval."""
    plans = [load_plan(study) for study in (reference, other)]
    mismatched = [k for k in PAIRING_FIELDS if getattr(plans[0], k) != getattr(plans[1], k)]
    if mismatched:
        raise KDConfigurationError(f"The studies differ in {mismatched}: their runs are not paired. Compare studies "
                                   f"of the same dataset, plans, fold and schedule.")
    differing = {k: (v, getattr(plans[1], k)) for k, v in vars(plans[0]).items()
                 if k not in (*PAIRING_FIELDS, "trainers", "seeds", "device") and getattr(plans[1], k) != v}
    (ref_results, _, _), (other_results, _, _) = (collect(plans[0], reference.resolve()),
                                                  collect(plans[1], other.resolve()))
    names = trainers or [t for t in plans[1].trainers[1:] if t in plans[0].trainers]
    lines = [f"Paired by seed and case: `{other}` minus `{reference}`. The studies differ in: "
             + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differing.items()) or "nothing recorded") + ".", "",
             "| trainer | split | seeds | reference mean Dice | other mean Dice | Δ | 95 % CI | per seed Δ | "
             "won / lost / tied |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        if name not in ref_results or name not in other_results:
            raise KDConfigurationError(f"{name} is not in both studies ({list(ref_results)}, {list(other_results)}).")
        for split in SPLITS:
            other_dice, reference_dice, seeds = _paired(ref_results[name], other_results[name], split)
            if not seeds:
                continue
            c = compare(other_dice, reference_dice, None, num_resamples)
            per_seed = ", ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, c.per_seed_difference))
            lines.append(f"| {name} | {split} | {len(seeds)} | {np.nanmean(reference_dice):.3f} | "
                         f"{np.nanmean(other_dice):.3f} | {c.mean_difference:+.4f} | "
                         f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {per_seed} | {c.wins} / {c.losses} / {c.ties} |")
    return "\n".join(lines)
