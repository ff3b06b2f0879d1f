"""`nnunet_kd study-lesions`: the lesion scores of a study's test-set predictions (`nnunet_kd.evaluation.lesions`),
per case and run, and each KD trainer against the baseline, paired by seed and case with the study's crossed
interval (`nnunet_kd.tools.study_stats`): the numbers a reader of a lesion segmentation looks at beside Dice."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.evaluation.lesions import SCORES, lesion_scores
from nnunet_kd.tools.study import load_plan, plan_runs
from nnunet_kd.tools.study_stats import PairedComparison, compare, few_seeds_note

CSV_FILE = "per_case_lesions.csv"
REPORT_FILE = "lesions.md"
TEACHER = "teacher"
# the scores compared against the baseline, and which way is better
COMPARED = {"fp_ml_lesion_free_slices": "lower", "hd95_mm": "lower", "dice": "higher"}


def _read_label(path: Path, label: int) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image) == label, tuple(reversed(image.GetSpacing()))


def score_folder(predictions: Path, labels: Path, label: int) -> list[dict]:
    """One row per reference case in `labels`: its lesion scores against nnUNetv2_predict's output in
    `predictions` (the same file name)."""
    file_ending = json.loads((predictions / "dataset.json").read_text())["file_ending"]
    rows = []
    for reference_file in sorted(labels.glob(f"*{file_ending}")):
        predicted_file = predictions / reference_file.name
        if not predicted_file.is_file():
            raise KDConfigurationError(f"{predicted_file} is missing: {predictions} does not hold a prediction of "
                                       f"every test case. Re-run the study to finish its test predictions.")
        reference, spacing = _read_label(reference_file, label)
        prediction, _ = _read_label(predicted_file, label)
        rows.append({"case": reference_file.name[:-len(file_ending)], **lesion_scores(reference, prediction, spacing)})
    return rows


def study_lesion_rows(study: Path, label: int = 1) -> list[dict]:
    """Every test-set prediction of the study scored: the teacher's, then each run's that has finished testing."""
    plan = load_plan(study)
    if plan.test_labels is None:
        raise KDConfigurationError(f"The study {study} has no test set; lesion scores are computed on its test-set "
                                   f"predictions. Run the study with --test-images and --test-labels.")
    labels = Path(plan.test_labels)
    rows = []
    teacher = study / "predictions" / TEACHER
    if (teacher / "summary.json").is_file():
        rows += [{"model": TEACHER, "seed": "", **row} for row in score_folder(teacher, labels, label)]
    for run in plan_runs(plan, study):
        if (run.test_predictions / "summary.json").is_file():
            rows += [{"model": run.trainer, "seed": run.seed, **row}
                     for row in score_folder(run.test_predictions, labels, label)]
    if not rows:
        raise KDConfigurationError(f"No run of the study {study} has predicted its test set yet.")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["model", "seed", "case", *SCORES])
        writer.writeheader()
        writer.writerows(rows)


def _matrix(rows: list[dict], model: str, score: str, seeds: list, cases: list[str]) -> np.ndarray:
    value = {(row["seed"], row["case"]): float(row[score]) for row in rows if row["model"] == model}
    return np.array([[value[seed, case] for case in cases] for seed in seeds])


def _mean_over_seeds(values: list[float]) -> str:
    if not values or all(np.isnan(values)):
        return "-"
    mean = float(np.nanmean(values))
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {float(np.nanstd(values, ddof=1)):.3f}"


def _claim(result: PairedComparison, better: str) -> str:
    """The study's claim rule (enough seeds, an interval that excludes zero) in the words of a score where `better`
    is "lower" or "higher"."""
    if not result.enough_seeds:
        return f"no claim ({result.num_seeds} seed{'s' if result.num_seeds > 1 else ''})"
    if not result.excludes_zero:
        return "no difference shown"
    lower = result.mean_difference < 0
    return f"{'lower' if lower else 'higher'} with KD ({'better' if (better == 'lower') == lower else 'worse'})"


def lesion_report(rows: list[dict], trainers: list[str], label: int) -> str:
    """Markdown: every model's lesion scores (mean over cases, then over seeds), and each KD trainer against the
    baseline (the first trainer) on the seeds both have."""
    cases = sorted({row["case"] for row in rows})
    seeds_of = {model: sorted({row["seed"] for row in rows if row["model"] == model})
                for model in [TEACHER, *trainers]}
    lines = [f"## Lesion scores, test set: {len(cases)} cases, label {label}", "",
             "Per case, then averaged over cases and (± SD) over seeds. FP mL: predicted lesion on slices where the "
             "reference has none; FP slices: the share of lesion-free slices with any; HD95 over the cases where both "
             "masks have the lesion; missed / false alarms: cases with the lesion and no prediction / the reverse, "
             "per seed.", "",
             "| model | seeds | Dice | FP mL on lesion-free slices | FP slices | HD95 mm | missed / false alarms |",
             "|---|---|---|---|---|---|---|"]
    for model, seeds in seeds_of.items():
        if not seeds:
            continue
        scores = {score: _matrix(rows, model, score, seeds, cases) for score in SCORES}  # seeds x cases each
        with np.errstate(all="ignore"):  # HD95 of a seed whose every case is undefined: NaN, shown as "-"
            per_seed = {score: list(np.nanmean(scores[score], axis=1))
                        for score in ("dice", "fp_ml_lesion_free_slices", "hd95_mm")}
        share = list(scores["lesion_free_slices_with_fp"].sum(1) / np.maximum(scores["lesion_free_slices"].sum(1), 1))
        missed, alarms = scores["missed"].sum(1).mean(), scores["false_alarm"].sum(1).mean()
        name = f"{model} (baseline)" if model == trainers[0] and len(trainers) > 1 else model
        lines.append(f"| {name} | {len(seeds) if model != TEACHER else '-'} | {_mean_over_seeds(per_seed['dice'])} | "
                     f"{_mean_over_seeds(per_seed['fp_ml_lesion_free_slices'])} | {_mean_over_seeds(share)} | "
                     f"{_mean_over_seeds(per_seed['hd95_mm'])} | {missed:g} / {alarms:g} |")
    lines += ["", "### KD against the baseline, paired by seed and case", "",
              "Δ: KD minus baseline, mean over seeds and cases; 95 % CI over seeds and cases crossed (as the Dice "
              "tables of `nnunet_kd study`); HD95 over the cases where it is defined in every run of both.", "",
              "| trainer | score | seeds | cases | Δ | 95 % CI | per seed Δ | claim |",
              "|---|---|---|---|---|---|---|---|"]
    notes = set()
    for trainer in trainers[1:]:
        seeds = sorted(set(seeds_of[trainer]) & set(seeds_of[trainers[0]]))
        if not seeds:
            continue
        for score, better in COMPARED.items():
            result = compare(_matrix(rows, trainer, score, seeds, cases),
                             _matrix(rows, trainers[0], score, seeds, cases))
            per_seed = ", ".join(f"{d:+.4f}" for d in result.per_seed_difference)
            lines.append(f"| {trainer} | {score} | {len(seeds)} | {result.num_cases} | {result.mean_difference:+.4f} "
                         f"| {result.interval_text()} | {per_seed} | {_claim(result, better)} |")
            notes.add(few_seeds_note(len(seeds)))
    return "\n".join(lines + [""] + sorted(n for n in notes if n)) + "\n"


def write_lesion_report(study: Path, label: int = 1) -> Path:
    """Score the study's test predictions; write `per_case_lesions.csv` and `lesions.md` into the study folder."""
    rows = study_lesion_rows(study, label)
    write_csv(study / CSV_FILE, rows)
    report = study / REPORT_FILE
    report.write_text(lesion_report(rows, list(load_plan(study).trainers), label))
    return report
