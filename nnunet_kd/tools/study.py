"""`nnunet_kd study`: does distillation pay off on this dataset? Paired seeds, stock nnU-Net commands, one report.

For every seed, every trainer (the first is the no-KD baseline) trains the same student plans from the same initial
weights (`nnUNet_KD_seed`) with the stock `nnUNetv2_train`; nnU-Net's final validation scores the fold, and a test
set, if given, is predicted with the stock `nnUNetv2_predict` and scored with nnU-Net's evaluation. Each seed has a
results folder of its own (`<study>/runs/seed_<s>` is `nnUNet_results` for its runs), so runs of different seeds
never share a model folder. Re-running continues: finished runs are skipped, interrupted ones resume with `--c`.
The report (`nnunet_kd.tools.study_report`) compares every KD trainer with the baseline, seed by seed and case by case.
A study of one trainer has no baseline: it is one side of a comparison that `nnunet_kd study-compare` makes with another
study of the same runs but one setting (e.g. students of the 5-fold ensemble's targets against fold 0's).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_kd.core.settings import (
    ENV_ITERATIONS_PER_EPOCH,
    ENV_NUM_EPOCHS,
    ENV_SEED,
    ENV_STUDENT_CHANNELS,
    ENV_TEACHER,
    ENV_TEACHER_TARGETS,
    ENV_VAL_ITERATIONS_PER_EPOCH,
    KDConfigurationError,
    ensure_ext_trainer,
)
from nnunet_kd.tools import command_environment

STUDY_FILE = "study.json"
# which folds of the teacher, with or without mirroring, predicted the test set
TEST_TEACHER_FILE = "teacher.json"
# what may differ when a study is re-run into the same folder: more trainers or seeds, another test set or device,
# how its cases are grouped in the report
EXTENSIBLE_FIELDS = ("trainers", "seeds", "test_images", "test_labels", "device", "group_pattern")
# what two studies must share for their runs of one seed to be the same experiment (paired, or one reused)
PAIRING_FIELDS = ("dataset", "configuration", "plans", "fold", "num_epochs", "iterations_per_epoch", "schedule",
                  "student_channels")


@dataclass(frozen=True)
class StudyPlan:
    dataset: str  # nnU-Net dataset name, e.g. Dataset004_Hippocampus
    configuration: str
    plans: str  # the students' plans
    teacher: str  # absolute model folder
    trainers: tuple[str, ...]  # the first one is the baseline (no KD)
    seeds: tuple[int, ...]
    fold: int = 0
    num_epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    schedule: str | None = None  # a named schedule class suffix (`<trainer>_<schedule>`), instead of the two above
    test_images: str | None = None
    test_labels: str | None = None
    device: str = "cpu"
    # stored teacher outputs (`nnunet_kd teacher-targets`) the KD trainers learn from instead of the teacher network
    teacher_targets: str | None = None
    # the students' input channels by name, when they see fewer than the dataset (and the teacher) has
    student_channels: str | None = None
    # cases that are one patient (e.g. `(patient\d+)_`: ACDC's two frames), averaged per patient before an interval
    group_pattern: str | None = None

    def trainer_class(self, trainer: str) -> str:
        return f"{trainer}_{self.schedule}" if self.schedule else trainer

    def environment(self) -> dict[str, str]:
        """Variables every training run of this study gets (besides its seed and results folder)."""
        env = {ENV_TEACHER: self.teacher}
        if self.teacher_targets:
            env[ENV_TEACHER_TARGETS] = self.teacher_targets
        if self.student_channels:
            env[ENV_STUDENT_CHANNELS] = self.student_channels
        if self.num_epochs:
            env[ENV_NUM_EPOCHS] = str(self.num_epochs)
        if self.iterations_per_epoch:
            env[ENV_ITERATIONS_PER_EPOCH] = str(self.iterations_per_epoch)
        if self.val_iterations_per_epoch:
            env[ENV_VAL_ITERATIONS_PER_EPOCH] = str(self.val_iterations_per_epoch)
        return env

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    seed: int
    trainer: str
    study: Path = field(compare=False)
    plan: StudyPlan = field(compare=False, repr=False)

    @property
    def results_root(self) -> Path:
        return self.study / "runs" / f"seed_{self.seed}"

    @property
    def model_folder(self) -> Path:
        return (self.results_root / self.plan.dataset
                / f"{self.plan.trainer_class(self.trainer)}__{self.plan.plans}__{self.plan.configuration}")

    @property
    def fold_folder(self) -> Path:
        return self.model_folder / f"fold_{self.plan.fold}"

    @property
    def validation_summary(self) -> Path:
        return self.fold_folder / "validation" / "summary.json"

    @property
    def test_predictions(self) -> Path:
        return self.study / "predictions" / f"seed_{self.seed}" / self.trainer

    @property
    def log_file(self) -> Path:
        return self.study / "logs" / f"seed_{self.seed}" / f"{self.trainer}.log"

    @property
    def trained(self) -> bool:
        return (self.fold_folder / "checkpoint_final.pth").is_file() and self.validation_summary.is_file()

    @property
    def tested(self) -> bool:
        return self.plan.test_images is None or (self.test_predictions / "summary.json").is_file()


def plan_runs(plan: StudyPlan, study: Path) -> list[Run]:
    """Seed by seed, every trainer of a seed before the next seed: a study stopped early has complete pairs."""
    return [Run(seed, trainer, study, plan) for seed in plan.seeds for trainer in plan.trainers]


def save_or_check_plan(plan: StudyPlan, study: Path) -> None:
    """Record the plan; a re-run may add trainers or seeds, but never changes what the existing runs mean."""
    path = study / STUDY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        current = plan.to_json()
        changed = {k: (recorded.get(k), v) for k, v in current.items()
                   if k not in EXTENSIBLE_FIELDS and _jsonable(recorded.get(k)) != _jsonable(v)}
        if changed:
            lines = "\n  - ".join(f"{k}: {old!r} in {path}, now {new!r}" for k, (old, new) in changed.items())
            raise KDConfigurationError(f"{study} holds a study with other settings, whose runs would not be comparable "
                                       f"with these:\n  - {lines}\nUse another output folder (-o), or the recorded "
                                       f"settings.")
    study.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_json(), indent=2))
    with open(study / "machines.txt", "a") as f:  # one line per invocation: a study may span several sessions
        f.write(f"{time.strftime('%Y-%m-%d %H:%M')} {machine_description(plan.device)}\n")


def record_group_pattern(study: Path, group_pattern: str | None) -> None:
    """A report re-made with another case grouping (`--report-only`) records it, so that `study-report` and
    `study-compare` group as that report did; the runs are untouched."""
    path = study / STUDY_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        path.write_text(json.dumps({**recorded, "group_pattern": group_pattern}, indent=2))


def load_plan(study: Path) -> StudyPlan:
    """The plan recorded in a study folder."""
    path = study / STUDY_FILE
    if not path.is_file():
        raise KDConfigurationError(f"{study} is not a study folder (no {STUDY_FILE}).")
    recorded = json.loads(path.read_text())
    return StudyPlan(**{**recorded, "trainers": tuple(recorded["trainers"]), "seeds": tuple(recorded["seeds"])})


def baseline_source(plan: StudyPlan, source: Path) -> StudyPlan:
    """The plan of another study whose baseline runs are this study's runs: same dataset, plans, fold, schedule and
    baseline trainer (and teacher, if the baseline learns from one). Refused, naming what differs, otherwise."""
    source_plan = load_plan(source)
    baseline = plan.trainers[0]
    fields = PAIRING_FIELDS + (("teacher", "teacher_targets") if _learns_from_teacher(plan.trainer_class(baseline))
                               else ())
    mismatched = [f"{k}: {getattr(source_plan, k)!r} there, {getattr(plan, k)!r} here" for k in fields
                  if getattr(source_plan, k) != getattr(plan, k)]
    if source_plan.trainers[0] != baseline:
        mismatched.append(f"baseline trainer: {source_plan.trainers[0]} there, {baseline} here")
    if mismatched:
        lines = "\n  - ".join(mismatched)
        raise KDConfigurationError(f"--baseline-from {source}: its baseline runs are not this study's:\n  - {lines}\n"
                                   f"Reuse a study of the same dataset, plans, fold, schedule and baseline trainer.")
    return source_plan


def reuse_baseline_runs(plan: StudyPlan, study: Path, source: Path, source_plan: StudyPlan) -> list[int]:
    """Copy the finished baseline runs of `source` (checked by `baseline_source`), with their test predictions where
    the test set is the same, for the seeds both studies have, and the machines that trained them. Runs already here
    are never replaced. Returns the seeds copied."""
    import shutil

    same_test_set = (source_plan.test_images, source_plan.test_labels) == (plan.test_images, plan.test_labels)
    copied = []
    for seed in sorted(set(plan.seeds) & set(source_plan.seeds)):
        there = Run(seed, plan.trainers[0], source.resolve(), source_plan)
        here = Run(seed, plan.trainers[0], study, plan)
        if not there.trained or here.model_folder.exists():
            continue
        shutil.copytree(there.model_folder, here.model_folder)
        if same_test_set and plan.test_images is not None and there.tested and not here.test_predictions.exists():
            shutil.copytree(there.test_predictions, here.test_predictions)
        here.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(here.log_file, "a") as log:
            log.write(f"# copied from {there.model_folder}\n")
        copied.append(seed)
    source_machines, machines = source / "machines.txt", study / "machines.txt"
    if copied and source_machines.is_file():  # the report's "Trained on" names what trained every run here
        known = set(machines.read_text().splitlines()) if machines.is_file() else set()
        with open(machines, "a") as f:
            f.writelines(f"{line}\n" for line in source_machines.read_text().splitlines() if line not in known)
    return copied


def _learns_from_teacher(trainer_class: str) -> bool:
    from nnunet_kd.core.output_space import nnUNetTrainerKD

    return issubclass(_find_trainer_class(trainer_class), nnUNetTrainerKD)


def machine_description(device: str) -> str:
    """What trained the runs: device name, CPU cores, torch and nnU-Net versions (recorded with the study)."""
    import platform
    from importlib.metadata import version

    import torch

    where = (torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available()
             else f"CPU ({platform.processor() or platform.machine()})")
    return (f"{where}, {os.cpu_count()} CPU cores, torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, "
            f"nnunet-kd {version('nnunet-kd')}")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _run_command(args: list[str], env: dict[str, str], log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        result = subprocess.run(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise KDConfigurationError(f"`{' '.join(args)}` failed (exit {result.returncode}); last lines of {log_file}:"
                                   f"\n{tail}")


def stored_targets_teacher(plan: StudyPlan) -> dict:
    """The teacher entry of the stored targets' manifest (model folder, folds, mirroring)."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_kd.teachers.stored_targets import StoredTargets

    folder = Path(nnUNet_preprocessed.get()) / plan.dataset
    return StoredTargets.locate(plan.teacher_targets, folder).manifest["teacher"]


def teacher_as_learned(plan: StudyPlan) -> tuple[tuple[int, ...], bool]:
    """Folds and mirroring of the teacher the students learn from, as the test set is predicted with it: the stored
    targets' (an ensemble, mirrored or not), else the study fold's network with nnU-Net's default mirroring."""
    if not plan.teacher_targets:
        return (plan.fold,), True
    teacher = stored_targets_teacher(plan)
    return tuple(teacher["folds"]), bool(teacher["mirroring"])


def check_inputs(plan: StudyPlan) -> None:
    """Everything that can be wrong before the first run: folders, plans, trainer classes, the teacher."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_kd.teachers.frozen import TeacherSpec, check_teacher_files

    if not nnUNet_preprocessed.is_set():
        raise KDConfigurationError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    plans_file = Path(nnUNet_preprocessed.get()) / plan.dataset / f"{plan.plans}.json"
    if not plans_file.is_file():
        raise KDConfigurationError(f"Student plans {plans_file} not found. Write them first, e.g. `nnunet_kd "
                                   f"student-plans {plan.dataset} -c {plan.configuration} --width 0.25`.")
    configurations = json.loads(plans_file.read_text())["configurations"]
    if plan.configuration not in configurations:
        raise KDConfigurationError(f"{plans_file} has no configuration {plan.configuration!r} (it has "
                                   f"{sorted(configurations)}).")
    if plan.student_channels:
        from nnunet_kd.students.modalities import select_channels

        dataset_json = json.loads((Path(nnUNet_preprocessed.get()) / plan.dataset / "dataset.json").read_text())
        select_channels(dataset_json, plan.student_channels, "--student-channels")
    check_teacher_files(TeacherSpec(plan.teacher, (plan.fold,), "checkpoint_final.pth"), plan.dataset,
                        plan.configuration)
    if plan.teacher_targets:
        stored_teacher = Path(stored_targets_teacher(plan)["model_folder"])
        if stored_teacher.resolve() != Path(plan.teacher).resolve():
            raise KDConfigurationError(f"The stored targets {plan.teacher_targets} come from the teacher "
                                       f"{stored_teacher}, the study's --teacher is {plan.teacher}: give the "
                                       f"teacher the targets were written with.")
    if (plan.test_images is None) != (plan.test_labels is None):
        raise KDConfigurationError("Give both --test-images and --test-labels, or neither.")
    for folder in (plan.test_images, plan.test_labels):
        if folder is not None and not Path(folder).is_dir():
            raise KDConfigurationError(f"Test folder {folder} not found.")
    if len(set(plan.trainers)) != len(plan.trainers):
        raise KDConfigurationError(f"Give each trainer once (the first is the baseline); got {list(plan.trainers)}.")
    _check_trainer_classes([plan.trainer_class(t) for t in plan.trainers])


def _check_trainer_classes(names: Sequence[str]) -> None:
    for name in names:
        _find_trainer_class(name)


def _find_trainer_class(name: str) -> type:
    """A trainer class as `nnUNetv2_train` finds it (nnU-Net's, or nnUNet_extTrainer's: this package's by default)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    folder = ensure_ext_trainer()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError as e:
        raise KDConfigurationError(f"Trainer class {name} not found in nnU-Net or in nnUNet_extTrainer "
                                   f"({folder}). Check its name (and --schedule).") from e


def _format_seconds(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes >= 60 else f"{minutes} min"


class Progress:
    """'run i of n', elapsed time, and an estimate of what is left from the runs trained in this invocation."""

    def __init__(self, total: int, jobs: int = 1):
        self.total, self.jobs, self.started, self.durations = total, max(1, jobs), time.time(), []

    def line(self, index: int, message: str) -> str:
        elapsed = time.time() - self.started
        left = self.total - index + 1
        estimate = (f", about {_format_seconds(left * sum(self.durations) / len(self.durations) / self.jobs)} left"
                    if self.durations else "")
        return f"[{time.strftime('%H:%M:%S')}] run {index} of {self.total}: {message} (elapsed " \
               f"{_format_seconds(elapsed)}{estimate})"


def train(run: Run) -> None:
    plan = run.plan
    args = ["nnUNetv2_train", plan.dataset, plan.configuration, str(plan.fold), "-tr", plan.trainer_class(run.trainer),
            "-p", plan.plans, "-device", plan.device]
    if (run.fold_folder / "checkpoint_final.pth").is_file():
        args.append("--val")  # trained, but the final validation did not finish
    elif (run.fold_folder / "checkpoint_latest.pth").is_file():
        args.append("--c")
    env = command_environment({**plan.environment(), ENV_SEED: str(run.seed),
                                "nnUNet_results": str(run.results_root)})
    _run_command(args, env, run.log_file)


def student_test_images(plan: StudyPlan, study: Path) -> str:
    """The folder the students predict the test set from: their own channels of it, made once, where they see fewer
    channels than the dataset has; else the test images themselves."""
    if not plan.student_channels:
        return plan.test_images
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_kd.students.modalities import subset_images

    dataset_json = json.loads((Path(nnUNet_preprocessed.get()) / plan.dataset / "dataset.json").read_text())
    return str(subset_images(plan.test_images, study / "test_inputs", dataset_json, plan.student_channels))


def predict_and_evaluate(model_folder: Path, results_root: Path, trainer_class: str, plan: StudyPlan,
                         output: Path, log_file: Path, folds: tuple[int, ...] | None = None,
                         mirroring: bool = True, images: str | None = None) -> None:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2

    if (output / "summary.json").is_file():
        return
    plans = model_folder.name.split("__")[1]
    args = ["nnUNetv2_predict", "-i", images or plan.test_images, "-o", str(output), "-d", plan.dataset,
            "-c", plan.configuration, "-f", *[str(f) for f in folds or (plan.fold,)], "-tr", trainer_class, "-p",
            plans, "-device", plan.device, "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    if not mirroring:
        args.append("--disable_tta")
    _run_command(args, command_environment({"nnUNet_results": str(results_root)}), log_file)
    compute_metrics_on_folder2(plan.test_labels, str(output), str(model_folder / "dataset.json"),
                               str(model_folder / "plans.json"), str(output / "summary.json"), num_processes=1)


def run_study(plan: StudyPlan, study: Path, jobs: int = 1, baseline_from: Path | None = None) -> None:
    """Train, validate and test every run that is not done yet (`nnunet_kd.tools.study_report` then reports).

    `jobs` > 1 trains that many runs at once (a GPU with room for several small students); runs still start in
    seed order. `baseline_from`: another study whose finished baseline runs this one reuses (`reuse_baseline_runs`).
    """
    from concurrent.futures import ThreadPoolExecutor

    study = study.resolve()
    check_inputs(plan)
    source_plan = baseline_source(plan, baseline_from) if baseline_from is not None else None
    save_or_check_plan(plan, study)
    if source_plan is not None:
        copied = reuse_baseline_runs(plan, study, baseline_from, source_plan)
        print(f"baseline runs of seeds {copied} copied from {baseline_from.resolve()}" if copied else
              f"no baseline run copied from {baseline_from.resolve()} (none finished there that is not here)",
              flush=True)
    runs = plan_runs(plan, study)
    progress = Progress(len(runs), jobs)
    compared = (f"baseline: {plan.trainers[0]}" if len(plan.trainers) > 1 else
                "one trainer: `nnunet_kd study-compare` pairs it with another study")
    print(f"study of {len(plan.trainers)} trainer(s) x {len(plan.seeds)} seeds in {study} ({compared})", flush=True)

    def complete(index: int, run: Run) -> None:
        what = f"seed {run.seed}, {plan.trainer_class(run.trainer)}"
        if run.trained and run.tested:
            print(progress.line(index, f"{what}: done"), flush=True)
            return
        if not run.trained:
            print(progress.line(index, f"{what}: training (log: {run.log_file})"), flush=True)
            started = time.time()
            train(run)
            progress.durations.append(time.time() - started)
            print(progress.line(index, f"{what}: trained in {_format_seconds(time.time() - started)}"), flush=True)
        if not run.tested:
            print(progress.line(index, f"{what}: predicting the test set"), flush=True)
            predict_and_evaluate(run.model_folder, run.results_root, plan.trainer_class(run.trainer), plan,
                                 run.test_predictions, run.log_file, images=student_test_images(plan, study))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(complete, index, run) for index, run in enumerate(runs, 1)]:
            future.result()  # the first failure stops the study (runs already started finish)
    if plan.test_images is not None:
        teacher = Path(plan.teacher)
        folds, mirroring = teacher_as_learned(plan)
        output = study / "predictions" / "teacher"
        predict_and_evaluate(teacher, teacher.parents[1], teacher.name.split("__")[0], plan, output,
                             study / "logs" / "teacher_predict.log", folds, mirroring)
        (output / TEST_TEACHER_FILE).write_text(json.dumps({"folds": list(folds), "mirroring": mirroring}))
