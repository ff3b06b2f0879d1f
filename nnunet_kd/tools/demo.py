"""`nnunet_kd demo`: teacher, plain student and KD student on the generated dataset, with stock nnU-Net tools.

Every step is the command a user would type (nnUNetv2_plan_and_preprocess, nnUNetv2_train, nnUNetv2_predict);
evaluation is nnU-Net's own. Steps whose results already exist are skipped, so an interrupted demo continues.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_kd.core.checkpoints import count_weights, load_checkpoint
from nnunet_kd.core.settings import TRAINERS_FOLDER
from nnunet_kd.data.synthetic import LABELS, SyntheticSpec, write_dataset
from nnunet_kd.tools import command_environment
from nnunet_kd.tools.bench import bench_infer
from nnunet_kd.tools.results import CaseScores, read_summary

DATASET_ID = 900
DATASET = f"Dataset{DATASET_ID}_KDSynthetic"
CONFIGURATION = "3d_fullres"
DEMO_SPEC = SyntheticSpec(shape=(32, 40, 40), num_training=24, num_test=6, seed=0)
STUDENT_WIDTH = 0.25
# nnU-Net lines worth showing while a step runs; everything else goes to the step's log file
PROGRESS_MARKERS = ("Epoch ", "train_loss", "seg_loss", "Pseudo dice", "Mean Validation Dice", "Error", "error")


@dataclass(frozen=True)
class DemoModel:
    title: str
    trainer: str
    plans: str

    @property
    def folder_name(self) -> str:
        return f"{self.trainer}__{self.plans}__{CONFIGURATION}"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(args: list[str], env: dict, log_file: Path) -> None:
    _log("$ " + " ".join(args))
    with open(log_file, "w") as log:
        process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if any(marker in line for marker in PROGRESS_MARKERS):
                print("    " + line.rstrip(), flush=True)
        if process.wait() != 0:
            raise SystemExit(f"step failed (exit {process.returncode}); see {log_file}")


def workspace_environment(workdir: Path) -> dict:
    """nnU-Net's folder variables for a workspace laid out like the demo's."""
    return {"nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
            "nnUNet_results": str(workdir / "results"),
            "nnUNet_extTrainer": os.environ.get("nnUNet_extTrainer")
            or str(TRAINERS_FOLDER)}


def _environment(workdir: Path) -> dict:
    return command_environment({
        **workspace_environment(workdir),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", str(max(1, min(4, (os.cpu_count() or 2) - 1)))),
        "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 2))),
    })


def _parameters(model_folder: Path) -> int:
    return count_weights(load_checkpoint(model_folder / "fold_0" / "checkpoint_final.pth")["network_weights"])


def _evaluate(predictions: Path, labels: Path) -> CaseScores:
    """nnU-Net's evaluation of the predictions (its summary.json), read as every report here reads it."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    foreground = [v for v in LABELS.values() if v > 0]
    compute_metrics_on_folder(str(labels), str(predictions), str(predictions / "summary.json"), SimpleITKIO(),
                              ".nii.gz", foreground, None, num_processes=2)
    return read_summary(predictions / "summary.json", LABELS)


def run_demo(workdir: Path, device: str = "cpu", fresh: bool = False) -> list[dict]:
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = _environment(workdir)
    started = time.time()

    raw = workdir / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        _log(f"generating {DATASET}: {DEMO_SPEC.num_training} training + {DEMO_SPEC.num_test} held-out volumes "
             f"{DEMO_SPEC.shape}")
        write_dataset(workdir / "raw", DATASET_ID, spec=DEMO_SPEC)
    preprocessed = workdir / "preprocessed" / DATASET
    if not (preprocessed / "nnUNetPlans.json").is_file():
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-npfp", "2", "-np", "2"],
             env, workdir / "logs" / "plan_and_preprocess.log")
    _run(["nnunet_kd", "student-plans", str(DATASET_ID), "-c", CONFIGURATION, "--width", str(STUDENT_WIDTH)], env,
         workdir / "logs" / "student_plans.log")
    print((workdir / "logs" / "student_plans.log").read_text(), flush=True)
    student_plans = f"nnUNetPlans_KDStudent_w{STUDENT_WIDTH:g}"

    models = [DemoModel("teacher", "nnUNetTrainer_demo", "nnUNetPlans"),
              DemoModel("student (no KD)", "nnUNetTrainerStudent_demo", student_plans),
              DemoModel("student + KD (KDLogits)", "nnUNetTrainerKDLogits_demo", student_plans)]
    results = workdir / "results" / DATASET
    # the same seed for both students: they start from identical weights, so the table compares KD, not luck
    train_env = {**env, "nnUNet_KD_teacher": models[0].folder_name,
                 "nnUNet_KD_seed": env.get("nnUNet_KD_seed", "0")}
    for model in models:
        if (results / model.folder_name / "fold_0" / "checkpoint_final.pth").is_file():
            _log(f"{model.title}: already trained, skipping")
            continue
        _log(f"training {model.title}: {model.trainer} -p {model.plans}")
        _run(["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", model.trainer, "-p", model.plans,
              "-device", device], train_env, workdir / "logs" / f"train_{model.folder_name}.log")

    images = raw / "imagesTs"
    test_cases = [[str(p)] for p in sorted(images.glob("*_0000.nii.gz"))]
    rows = []
    for model in models:
        out = workdir / "predictions" / model.folder_name
        _run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIGURATION,
              "-f", "0", "-tr", model.trainer, "-p", model.plans, "-device", device, "-npp", "1", "-nps", "1"],
             env, workdir / "logs" / f"predict_{model.folder_name}.log")
        scores = _evaluate(out, raw / "labelsTs")
        rows.append({
            "model": model.title, "trainer": model.trainer, "plans": model.plans,
            "parameters": _parameters(results / model.folder_name),
            "dice": scores.class_means, "mean_dice": scores.foreground_mean,
            "case_mean_dice": [float(d) for d in scores.mean_per_case],
        })
    _log(f"timing the models' inference on {len(test_cases)} held-out cases, side by side")
    timed = bench_infer([str(results / m.folder_name) for m in models], test_cases, device, memory=False)
    for row, costs in zip(rows, timed["models"]):
        row["seconds_per_case"] = costs["seconds_per_case"]
    (workdir / "demo_results.json").write_text(json.dumps(rows, indent=2))
    print(format_table(rows, device, time.time() - started), flush=True)
    return rows


def kd_effect_note(plain: dict, kd: dict) -> str:
    """KD's difference to the plain student, said for what it is: one pair of runs, one seed."""
    from nnunet_kd.tools.study_stats import MIN_SEEDS_FOR_A_CLAIM, few_seeds_note

    return (f"KD student - plain student: {kd['mean_dice'] - plain['mean_dice']:+.3f} mean Dice on the "
            f"{len(kd['case_mean_dice'])} held-out cases, one seed of a demo-length run. {few_seeds_note(1)} Whether "
            f"KD pays off on your data is what `nnunet_kd study` measures, over {MIN_SEEDS_FOR_A_CLAIM} or more "
            f"paired seeds (BENCHMARKS.md).")


def format_table(rows: list[dict], device: str, seconds: float) -> str:
    names = list(rows[0]["dice"])
    header = f"{'model':<26}{'parameters':>12}{'rel. size':>10}{'s/case':>9}" + "".join(f"{n:>9}" for n in names) \
        + f"{'mean':>8}"
    lines = [header, "-" * len(header)]
    teacher = rows[0]
    for row in rows:
        lines.append(f"{row['model']:<26}{row['parameters']:>12,}{row['parameters'] / teacher['parameters']:>10.3f}"
                     f"{row['seconds_per_case']:>9.2f}" + "".join(f"{row['dice'][n]:>9.3f}" for n in names)
                     + f"{row['mean_dice']:>8.3f}")
    notes = [f"Dice on {DEMO_SPEC.num_test} held-out cases (nnUNetv2_predict, nnU-Net's evaluation); s/case: median "
             f"network time per case on {device}, the models timed side by side (sliding window with mirroring, "
             f"preprocessing excluded)."]
    if len(rows) == 3:
        notes.append(kd_effect_note(rows[1], rows[2]))
    notes.append(f"Demo wall time: {seconds / 60:.1f} min.")
    return "\n".join(["", *lines, "", *notes])


if __name__ == "__main__":
    run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "nnunet_kd_demo"))
