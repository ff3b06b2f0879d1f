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

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.data.holdout import case_groups
from nnunet_kd.tools.results import CaseScores, read_summary
from nnunet_kd.tools.study import (
    PAIRING_FIELDS,
    STUDY_FILE,
    TEST_TEACHER_FILE,
    Run,
    StudyPlan,
    load_plan,
    plan_runs,
)
from nnunet_kd.tools.study_stats import PairedComparison, compare, few_seeds_note, group_cases, still_improving

SPLITS = {"validation": "validation (fold {fold})", "test": "test set"}
# the tables of a published study, as recomputed from its per-case Dice
TABLES_FILE = "tables.md"
# the parameters of the teacher and each trainer's student, and the teacher as the students learned from it
MODELS_FILE = "models.json"


@dataclass
class TrainerResult:
    """One trainer's finished runs, keyed by seed (a run may be trained but not yet tested)."""

    trainer: str
    scores: dict[str, dict[int, CaseScores]] = field(default_factory=dict)  # split -> seed -> scores
    improving: dict[int, bool] = field(default_factory=dict)  # seed -> still improving when it stopped
    final_ema: dict[int, float] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        """The trained seeds (scored on the validation fold)."""
        return list(self.scores.get("validation", {}))


def _run_logging(run: Run) -> dict:
    from nnunet_kd.core.checkpoints import load_checkpoint

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
        result.scores.setdefault("validation", {})[run.seed] = read_summary(run.validation_summary, labels)
        if plan.test_images is not None and run.tested:
            result.scores.setdefault("test", {})[run.seed] = read_summary(run.test_predictions / "summary.json",
                                                                           labels)
        ema = _run_logging(run).get("ema_fg_dice", [])
        result.improving[run.seed] = still_improving(ema)
        result.final_ema[run.seed] = float(ema[-1]) if ema else float("nan")
    return results, teacher_scores, labels


def _paired(baseline: TrainerResult, other: TrainerResult, split: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """seeds x cases mean Dice of both, on the seeds both have scores of on this split, paired by seed id."""
    mine, theirs = other.scores.get(split, {}), baseline.scores.get(split, {})
    seeds = [s for s in mine if s in theirs]
    if not seeds:
        return np.empty((0, 0)), np.empty((0, 0)), []
    for seed in seeds:
        if mine[seed].cases != theirs[seed].cases:
            raise KDConfigurationError(f"Seed {seed} of {other.trainer} and of {baseline.trainer} were scored on "
                                       f"different {split} cases; pair runs of the same cases only.")
    kd = np.stack([mine[s].mean_per_case for s in seeds])
    base = np.stack([theirs[s].mean_per_case for s in seeds])
    return kd, base, seeds


def unpaired_runs(baseline: TrainerResult, other: TrainerResult, split: str) -> list[str]:
    """Runs with a score on this split whose partner (the same seed of the other trainer) has none yet."""
    mine, theirs = other.scores.get(split, {}), baseline.scores.get(split, {})
    return [f"seed {s} of {baseline.trainer if s in theirs else other.trainer}"
            for s in sorted(set(mine) ^ set(theirs))]


@dataclass(frozen=True)
class TrainerComparison:
    result: PairedComparison
    seeds: list[int]
    unpaired: list[str]  # finished runs left out: their partner has no score on this split


def _teacher_per_case(teacher: CaseScores | None, cases: list[str]) -> np.ndarray | None:
    if teacher is None or teacher.cases != cases:
        return None
    return teacher.mean_per_case


def comparisons(results: dict[str, TrainerResult], teacher: dict[str, CaseScores], baseline: str,
                group_pattern: str | None = None) -> dict[str, dict[str, TrainerComparison]]:
    """split -> KD trainer -> its comparison with the baseline over the seeds both finished; with `group_pattern`
    each patient's cases averaged first (`study_stats.group_cases`)."""
    out: dict[str, dict[str, TrainerComparison]] = {}
    for split in SPLITS:
        for name, result in results.items():
            if name == baseline:
                continue
            kd, base, seeds = _paired(results[baseline], result, split)
            if not seeds:
                continue
            cases = results[baseline].scores[split][seeds[0]].cases
            teacher_dice = _teacher_per_case(teacher.get(split), cases)
            kd, base = group_cases(kd, cases, group_pattern), group_cases(base, cases, group_pattern)
            if teacher_dice is not None:
                teacher_dice = group_cases(teacher_dice, cases, group_pattern)
            out.setdefault(split, {})[name] = TrainerComparison(
                compare(kd, base, teacher_dice), seeds, unpaired_runs(results[baseline], result, split))
    return out


def grouping_note(cases: list[str], group_pattern: str | None) -> str:
    """The line a comparison table gets when a patient's cases are averaged before it."""
    if group_pattern is None:
        return ""
    groups = len(set(case_groups(list(cases), group_pattern).values()))
    return (f"Cases grouped by patient (`{group_pattern}`): the {len(cases)} cases are {groups} patients, each "
            f"patient's cases averaged before Δ, the interval and won / lost / tied, which count (seed, patient) "
            f"pairs.")


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
    channels = [None] * len(folders)
    if plan.student_channels:  # the cases have every channel; each student reads its own
        from nnunet_kd.students.modalities import select_channels

        picked = select_channels(predictors[0].dataset_json, plan.student_channels).indices
        channels = [None] + [picked] * (len(folders) - 1)
    rows = []
    for (name, folder), costs in zip(folders, network_costs(predictors, cases, device, channels=channels)):
        rows.append({"model": name, "folder": str(folder), "parameters": costs["parameters"],
                     "gflops_per_patch": costs["flops_per_patch"] / 1e9,
                     "cpu_seconds_per_case": costs["seconds_per_case"]})
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


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


COMPARISON_LEGEND = (
    "Paired by seed and case: Δ is the mean over seeds and cases of KD's Dice minus the baseline's. 95 % CI: seeds and "
    "cases crossed (every run is scored on the same cases), a generalized confidence interval over the seed, case and "
    "residual variance components (`nnunet_kd/tools/study_stats.py`); no interval from one seed. Claim: only with "
    "{min_seeds} or more paired seeds and an interval that excludes 0. Gap closed: (KD − baseline) / (teacher − "
    "baseline), given only where the teacher is clearly better than the baseline (that gap's own interval excludes 0). "
    "Won / lost: (seed, case) pairs where KD's Dice is higher / lower by more than 0.001.")


def dice_and_comparison_tables(plan: StudyPlan, results: dict[str, TrainerResult], teacher: dict[str, CaseScores],
                               compared: dict[str, dict[str, TrainerComparison]], level: int = 2) -> list[str]:
    """The Dice table and the KD-against-baseline table of every split: the part of the report that the per-case
    CSV alone reproduces (`nnunet_kd study-report`); `level`: the Markdown heading level of the Dice tables."""
    from nnunet_kd.tools.study_stats import MIN_SEEDS_FOR_A_CLAIM

    baseline = plan.trainers[0]
    classes = teacher["validation"].classes
    lines: list[str] = []
    for split, title in SPLITS.items():
        if split not in teacher:
            continue
        title = title.format(fold=plan.fold)
        lines += [f"{'#' * level} Dice, {title}: {len(teacher[split].cases)} cases", "",
                  "Mean ± standard deviation over seeds of each seed's mean over cases.", "",
                  "| model | seeds | " + " | ".join(classes) + " | mean Dice |",
                  "|---|---|" + "---|" * (len(classes) + 1)]
        t = teacher[split]
        lines.append("| teacher | - | " + " | ".join(_fmt(float(np.nanmean(t.dice[:, k]))) for k in range(len(classes)))
                     + f" | {_fmt(float(np.nanmean(t.mean_per_case)))} |")
        for name, result in results.items():
            scores = list(result.scores.get(split, {}).values())
            if not scores:
                continue
            per_class = [_mean_sd([float(np.nanmean(s.dice[:, k])) for s in scores]) for k in range(len(classes))]
            mean = _mean_sd([float(np.nanmean(s.mean_per_case)) for s in scores])
            marked = " (baseline)" if name == baseline and len(results) > 1 else ""
            lines.append(f"| {name}{marked} | {len(scores)} | "
                         + " | ".join(per_class) + f" | {mean} |")
        lines.append("")
        if split not in compared:
            continue
        lines += [f"{'#' * (level + 1)} KD against the baseline, {title}", "",
                  COMPARISON_LEGEND.format(min_seeds=MIN_SEEDS_FOR_A_CLAIM), "",
                  "| trainer | seeds | Δ mean Dice | 95 % CI | per seed Δ | claim | gap closed | won / lost / tied |",
                  "|---|---|---|---|---|---|---|---|"]
        grouped = grouping_note(teacher[split].cases, plan.group_pattern)
        notes = [grouped] if grouped else []
        for name, comparison in compared[split].items():
            c, seeds = comparison.result, comparison.seeds
            lines.append(f"| {name} | {len(seeds)} | {c.mean_difference:+.4f} | {c.interval_text()} | "
                         + ", ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, c.per_seed_difference))
                         + f" | {c.claim} | {c.gap if c.gap is not None else 'n/a'} | "
                         f"{c.wins} / {c.losses} / {c.ties} |")
            if comparison.unpaired:
                notes.append(f"{name}: compared over the seeds both finished ({', '.join(map(str, seeds))}); "
                             f"left out, their partner has no {split} score yet: {', '.join(comparison.unpaired)}.")
            if c.dropped_cases:
                notes.append(f"{name}: {c.dropped_cases} case(s) not scored in every run (nothing to find) left out.")
        fewest = min(len(comparison.seeds) for comparison in compared[split].values())
        notes += [few_seeds_note(fewest)] if few_seeds_note(fewest) else []
        lines += ["", *notes, ""] if notes else [""]
    return lines


def format_markdown(plan: StudyPlan, study: Path, results: dict[str, TrainerResult], teacher: dict[str, CaseScores],
                    compared: dict, costs: list[dict]) -> str:
    schedule = (f"named schedule `{plan.schedule}`" if plan.schedule else
                f"{plan.num_epochs or 'default'} epochs x {plan.iterations_per_epoch or 'default'} iterations")
    lines = [f"# KD study: {plan.dataset}, {plan.configuration}, student plans `{plan.plans}`", "",
             f"Teacher `{Path(plan.teacher).name}`; "
             + (f"baseline (no KD) `{plan.trainers[0]}`" if len(plan.trainers) > 1 else
                f"one trainer, `{plan.trainers[0]}`, no baseline here (`nnunet_kd study-compare` pairs it with "
                f"another study)")
             + f"; seeds {list(plan.seeds)}; "
             f"{schedule}; fold {plan.fold}; device {plan.device}. Each seed starts every trainer from the same "
             f"initial student weights."
             + (f" The students see the channels {plan.student_channels} only; the teacher sees every channel."
                if plan.student_channels else "")
             + (f" KD trainers learn from the stored teacher targets "
                                             f"`{Path(plan.teacher_targets).name}` (`nnunet_kd teacher-targets`)."
                                             if plan.teacher_targets else "")
             + _test_teacher_note(study, plan.fold), ""]
    machines = study_machines(study)
    if machines:
        lines += ["Trained on: " + "; ".join(machines), ""]
    lines += dice_and_comparison_tables(plan, results, teacher, compared)
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
            scores = result.scores["validation"][seed]
            value = float(np.nanmean(scores.mean_per_case))
            # a class the teacher finds but this run never learned (nnU-Net's all-background start, not left)
            missed = [c for k, c in enumerate(scores.classes)
                      if np.nanmean(scores.dice[:, k]) < 0.05 <= np.nanmean(teacher["validation"].dice[:, k])]
            flags = (" *still improving*" if result.improving.get(seed) else "") + \
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


CSV_FILE = "per_case_dice.csv"


def write_csv(path: Path, results: dict[str, TrainerResult], teacher: dict[str, CaseScores]) -> None:
    """Every per-case Dice of the study, one row per (split, model, seed, case): what its tables are computed from."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        classes = teacher["validation"].classes
        writer.writerow(["split", "model", "seed", "case", *[f"dice_{c}" for c in classes], "mean_dice"])
        for split, scores in teacher.items():
            for case, row, mean in zip(scores.cases, scores.dice, scores.mean_per_case):
                writer.writerow([split, "teacher", "", case, *[f"{v:.6f}" for v in row], f"{mean:.6f}"])
        for name, result in results.items():
            for split, per_seed in result.scores.items():
                for seed, scores in per_seed.items():
                    for case, row, mean in zip(scores.cases, scores.dice, scores.mean_per_case):
                        writer.writerow([split, name, seed, case, *[f"{v:.6f}" for v in row], f"{mean:.6f}"])


def read_csv(path: Path, trainers: tuple[str, ...]) -> tuple[dict[str, TrainerResult], dict[str, CaseScores]]:
    """The per-case Dice `write_csv` wrote, back as the trainers' results and the teacher's scores."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    class_columns = [i for i, name in enumerate(header) if name.startswith("dice_")]
    classes = [header[i].removeprefix("dice_") for i in class_columns]
    grouped: dict[tuple[str, str, str], list[list[str]]] = {}
    for row in rows:
        grouped.setdefault((row[0], row[1], row[2]), []).append(row)

    def scores(group: list[list[str]]) -> CaseScores:
        return CaseScores([r[3] for r in group], classes,
                          np.array([[float(r[i]) for i in class_columns] for r in group], dtype=float))

    teacher = {split: scores(group) for (split, model, _), group in grouped.items() if model == "teacher"}
    results = {t: TrainerResult(t) for t in trainers}
    for (split, model, seed), group in grouped.items():
        if model != "teacher":
            results.setdefault(model, TrainerResult(model)).scores.setdefault(split, {})[int(seed)] = scores(group)
    return results, teacher


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
        for seed, scores in result.scores.get("validation", {}).items():
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


def _comparison_json(compared: dict[str, dict[str, TrainerComparison]]) -> dict:
    return {split: {name: {"seeds": c.seeds, "mean_difference": c.result.mean_difference,
                           "ci95": list(c.result.ci) if c.result.ci else None,
                           "per_seed_difference": list(c.result.per_seed_difference), "claim": c.result.claim,
                           "gap_closed": c.result.gap.share if c.result.gap else None,
                           "won_lost_tied": [c.result.wins, c.result.losses, c.result.ties], "unpaired": c.unpaired}
                    for name, c in by_trainer.items()}
            for split, by_trainer in compared.items()}


def write_report(plan: StudyPlan, study: Path, time_cases: int = 3) -> Path:
    results, teacher, _ = collect(plan, study)
    compared = comparisons(results, teacher, plan.trainers[0], plan.group_pattern)
    costs = _model_costs(plan, study, results, time_cases) if time_cases > 0 else []
    markdown = format_markdown(plan, study, results, teacher, compared, costs)
    (study / "report.md").write_text(markdown)
    write_csv(study / CSV_FILE, results, teacher)
    record = {"plan": plan.to_json(), "comparisons": _comparison_json(compared), "costs": costs}
    (study / "comparison.json").write_text(json.dumps(record, indent=2))
    plot(study / "study.png", plan, results, teacher)
    print(markdown, flush=True)
    return study / "report.md"


def load_study(source: Path) -> tuple[StudyPlan, dict[str, TrainerResult], dict[str, CaseScores]]:
    """A study's plan, results and teacher scores, from its folder (nnU-Net's summaries) or from a published copy
    (`study.json` and `per_case_dice.csv` only, as `publish` writes them)."""
    plan = load_plan(source)
    if (source / "runs").is_dir():
        results, teacher, _ = collect(plan, source.resolve())
        return plan, results, teacher
    if not (source / CSV_FILE).is_file():
        raise KDConfigurationError(f"{source} holds neither a study's runs nor its {CSV_FILE}: give a study folder "
                                   f"(nnunet_kd study -o) or a folder `nnunet_kd study-report --publish` wrote.")
    return plan, *read_csv(source / CSV_FILE, plan.trainers)


def study_tables(source: Path, level: int = 4) -> str:
    """The Dice and KD-against-baseline tables of a study, recomputed from its per-case Dice (headings at `level`,
    to sit inside a page such as BENCHMARKS.md)."""
    plan, results, teacher = load_study(source)
    compared = comparisons(results, teacher, plan.trainers[0], plan.group_pattern)
    return "\n".join(dice_and_comparison_tables(plan, results, teacher, compared, level)).rstrip() + "\n"


def model_sizes(plan: StudyPlan, source: Path, results: dict[str, TrainerResult]) -> dict:
    """{"parameters": {"teacher": n, <trainer>: n, ...}, "teacher_as_learned": {"folds", "mirroring"} or None}:
    counted from the checkpoints of a study folder (the teacher's fold, each trainer's first seed), or read from the
    `models.json` of a published copy."""
    from nnunet_kd.core.checkpoints import count_weights, load_checkpoint

    if (source / MODELS_FILE).is_file():
        return json.loads((source / MODELS_FILE).read_text())
    if not (source / "runs").is_dir():
        raise KDConfigurationError(f"{source} has no {MODELS_FILE} (the model sizes): publish it again from its study "
                                   f"folder (`nnunet_kd study-report STUDY --publish DIR`).")
    folders = {"teacher": Path(plan.teacher) / f"fold_{plan.fold}"}
    folders.update({name: Run(result.seeds[0], name, source.resolve(), plan).fold_folder
                    for name, result in results.items() if result.seeds})
    missing = [str(folder / "checkpoint_final.pth") for folder in folders.values()
               if not (folder / "checkpoint_final.pth").is_file()]
    if missing:
        raise KDConfigurationError(f"{source}: the model sizes come from the checkpoints, and these are missing: "
                                   f"{', '.join(missing)}. Publish from the machine that holds the study's runs.")
    record = source / "predictions" / "teacher" / TEST_TEACHER_FILE
    return {"parameters": {name: count_weights(load_checkpoint(folder / "checkpoint_final.pth")["network_weights"])
                           for name, folder in folders.items()},
            "teacher_as_learned": json.loads(record.read_text()) if record.is_file() else None}


def publish(study: Path, destination: Path) -> Path:
    """Copy what a published table is computed from (plan, per-case Dice and model sizes, a few kB) out of a study
    folder, with the tables as they are recomputed from the copy."""
    import shutil

    plan, results, teacher = load_study(study)
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study / STUDY_FILE, destination / STUDY_FILE)
    write_csv(destination / CSV_FILE, results, teacher)
    (destination / MODELS_FILE).write_text(json.dumps(model_sizes(plan, study, results), indent=2) + "\n")
    (destination / TABLES_FILE).write_text(study_tables(destination))
    return destination / TABLES_FILE


def compare_studies(reference: Path, other: Path, trainers: list[str] | None = None) -> str:
    """The same trainers in two studies that differ in one setting (e.g. online vs stored-target KD), paired by seed
    (the same initial weights) and case: other minus reference, with the crossed seeds x cases interval. Either may
    be a study folder or a published copy of one."""
    (ref_plan, ref_results, _), (other_plan, other_results, _) = load_study(reference), load_study(other)
    mismatched = [k for k in PAIRING_FIELDS if getattr(ref_plan, k) != getattr(other_plan, k)]
    if mismatched:
        raise KDConfigurationError(f"The studies differ in {mismatched}: their runs are not paired. Compare studies "
                                   f"of the same dataset, plans, fold and schedule.")
    if ref_plan.group_pattern != other_plan.group_pattern:
        raise KDConfigurationError(f"The studies group their cases differently ({ref_plan.group_pattern!r} and "
                                   f"{other_plan.group_pattern!r}): re-run the report of one with the other's "
                                   f"--group-pattern (nnunet_kd study ... --report-only).")
    group_pattern = ref_plan.group_pattern
    differing = {k: (v, getattr(other_plan, k)) for k, v in vars(ref_plan).items()
                 if k not in (*PAIRING_FIELDS, "trainers", "seeds", "device") and getattr(other_plan, k) != v}
    # every KD trainer of `other` (its only trainer, in a study of one) that the reference has too
    names = trainers or [t for t in other_plan.trainers[1:] or other_plan.trainers if t in ref_plan.trainers]
    lines = [f"Paired by seed and case: `{other}` minus `{reference}`. The studies differ in: "
             + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differing.items()) or "nothing recorded") + ".", "",
             "| trainer | split | seeds | reference mean Dice | other mean Dice | Δ | 95 % CI | per seed Δ | claim | "
             "won / lost / tied |", "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in names:
        if name not in ref_results or name not in other_results:
            raise KDConfigurationError(f"{name} is not in both studies ({list(ref_results)}, {list(other_results)}).")
        for split in SPLITS:
            other_dice, reference_dice, seeds = _paired(ref_results[name], other_results[name], split)
            if not seeds:
                continue
            cases = ref_results[name].scores[split][seeds[0]].cases
            c = compare(*(group_cases(dice, cases, group_pattern) for dice in (other_dice, reference_dice)))
            per_seed = ", ".join(f"{s}: {d:+.3f}" for s, d in zip(seeds, c.per_seed_difference))
            lines.append(f"| {name} | {split} | {len(seeds)} | {np.nanmean(reference_dice):.3f} | "
                         f"{np.nanmean(other_dice):.3f} | {c.mean_difference:+.4f} | {c.interval_text()} | "
                         f"{per_seed} | {c.claim.replace('KD', 'other')} | {c.wins} / {c.losses} / {c.ties} |")
            unpaired = unpaired_runs(ref_results[name], other_results[name], split)
            if unpaired:
                notes.append(f"{name}, {split}: left out, their partner has no score yet: {', '.join(unpaired)}.")
            for note in (grouping_note(cases, group_pattern), few_seeds_note(len(seeds))):
                if note and note not in notes:
                    notes.append(note)
    return "\n".join(lines + ([""] + notes if notes else []))
