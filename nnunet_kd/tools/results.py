"""nnU-Net's results, read one way: a `summary.json` as a cases x classes Dice matrix named by dataset.json
(`read_summary`), the trained models of a dataset with their validation Dice, and the results report of
`nnunet_kd report` built on them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_kd.core.checkpoints import count_weights, load_checkpoint
from nnunet_kd.core.schedule import split_schedule
from nnunet_kd.core.settings import SETTINGS_FILE, KDConfigurationError
from nnunet_kd.tools.bench import load_predictor, network_costs, validation_cases


@dataclass
class CaseScores:
    """Dice per case and class of one model on one split; `classes` are dataset.json's label names."""

    cases: list[str]
    classes: list[str]
    dice: np.ndarray  # cases x classes

    @property
    def class_means(self) -> dict[str, float]:
        """Each class's Dice over the cases, as nnU-Net's summary.json `mean` (NaN cases left out)."""
        with np.errstate(all="ignore"):
            return {c: float(m) for c, m in zip(self.classes, np.nanmean(self.dice, axis=0))}

    @property
    def foreground_mean(self) -> float:
        """The mean of the class means, nnU-Net's `foreground_mean` Dice."""
        return float(np.mean(list(self.class_means.values())))

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


def collect_models(results_dataset_folder: Path) -> list[dict]:
    """Every trained fold in `$nnUNet_results/<dataset>` with nnU-Net's own validation summary."""
    rows = []
    for model in sorted(p for p in results_dataset_folder.iterdir() if p.is_dir() and p.name.count("__") == 2):
        trainer, plans, configuration = model.name.split("__")
        for fold in sorted(model.glob("fold_*")):
            summary, checkpoint = fold / "validation" / "summary.json", fold / "checkpoint_final.pth"
            if not (summary.is_file() and checkpoint.is_file()):
                continue
            labels = json.loads((model / "dataset.json").read_text())["labels"]
            scores = read_summary(summary, labels)
            settings = fold / SETTINGS_FILE
            rows.append({"model": model, "trainer": trainer, "plans": plans, "configuration": configuration,
                         "fold": fold.name.removeprefix("fold_"), "dice": scores.class_means,
                         "mean_dice": scores.foreground_mean,
                         "parameters": count_weights(load_checkpoint(checkpoint)["network_weights"]),
                         "kd": json.loads(settings.read_text()) if settings.is_file() else None})
    return rows


def _format_gap(row: dict) -> str:
    if row["kd"] is None:
        return ""
    gap = row["gap_closed"]
    return f"{gap:.0%}" if gap is not None and math.isfinite(gap) else "n/a"


def _gap_closed(row: dict, rows: list[dict]) -> float | None:
    """(KD − plain student) / (teacher − plain student), on mean validation Dice of the same fold.

    The plain student is like with like: the same plans, configuration, fold and named schedule (`_demo`, ...), trained
    by nnUNetTrainerStudent (or the stock trainer) of that schedule; None where there is no such run.
    """
    if row["kd"] is None:
        return None
    teacher_folder = Path(row["kd"]["teacher"]["model_folder"]).name
    teacher = [r for r in rows if r["model"].name == teacher_folder and r["fold"] == row["fold"]]
    schedule = split_schedule(row["trainer"])[1]
    plain = [r for r in rows if r["kd"] is None and r["plans"] == row["plans"] and r["fold"] == row["fold"]
             and r["configuration"] == row["configuration"]
             and split_schedule(r["trainer"]) in (("nnUNetTrainerStudent", schedule), ("nnUNetTrainer", schedule))]
    if not teacher or not plain:
        return None
    plain.sort(key=lambda r: not r["trainer"].startswith("nnUNetTrainerStudent"))
    gap = teacher[0]["mean_dice"] - plain[0]["mean_dice"]
    return (row["mean_dice"] - plain[0]["mean_dice"]) / gap if gap > 0 else None


def report(results_dataset_folder: Path, device: str = "cpu", time_cases: int = 2) -> str:
    """One Markdown table for a dataset: size, FLOPs, Dice per class (nnU-Net's validation summary.json), CPU
    seconds per case on that fold's validation cases, and the share of the Dice gap that KD closed."""
    rows = collect_models(results_dataset_folder)
    if not rows:
        raise KDConfigurationError(f"No trained model with a validation summary.json in {results_dataset_folder}.")
    torch_device = torch.device(device)
    for row in rows:
        predictor = load_predictor(str(row["model"]), (row["fold"] if row["fold"] == "all" else int(row["fold"]),),
                                    torch_device)
        costs = network_costs([predictor], validation_cases(row["model"], row["fold"], predictor, time_cases),
                              torch_device)[0]
        row["flops"], row["seconds_per_case"] = costs["flops_per_patch"], costs["seconds_per_case"]
    for row in rows:
        row["gap_closed"] = _gap_closed(row, rows)
    classes = list(rows[0]["dice"])
    header = ["trainer", "plans", "config", "fold", "params", "GFLOPs/patch", *[f"Dice {c}" for c in classes],
              "mean Dice", f"{device} s/case", "KD gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["trainer"], row["plans"], row["configuration"], row["fold"], f"{row['parameters']:,}",
                 f"{row['flops'] / 1e9:.2f}" if row["flops"] is not None else "n/a",
                 *[f"{row['dice'][c]:.4f}" for c in classes], f"{row['mean_dice']:.4f}",
                 f"{row['seconds_per_case']:.2f}" if row["seconds_per_case"] is not None else "n/a",
                 _format_gap(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Dice: nnU-Net's final validation of each model's fold (summary.json). KD gap closed: (KD − plain "
              "student) / (teacher − plain student) in mean validation Dice, against nnUNetTrainerStudent (or the "
              "stock trainer) with the same plans, fold and named schedule; n/a where there is no such run or no gap. "
              "One run each: for KD's effect beyond seed noise use `nnunet_kd study`."]
    return "\n".join(lines)
