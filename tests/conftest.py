"""Shared fixtures for the end-to-end tests: a real nnU-Net workspace on a tiny generated dataset.

Everything runs through nnU-Net's own command-line tools on the CPU with the `_debug` schedules (2 epochs of 3
iterations), the way a user runs them; each expensive step happens once per test session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import console_scripts
import pytest
from filelock import FileLock

from nnunet_kd.data.synthetic import SyntheticSpec, write_dataset

# before torch starts its OpenMP threads in this process: with two test workers on two cores, threads that wait
# sleep instead of spinning on the core the other worker's process needs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID:03d}_KDSynthetic"
TEACHER = "nnUNetTrainer_debug__nnUNetPlans__{}"
STUDENT_PLANS = "nnUNetPlans_KDStudent_w0.25"


@dataclass
class Workspace:
    root: Path
    env: dict

    @property
    def raw(self) -> Path:
        return self.root / "raw" / DATASET

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / DATASET

    @property
    def results(self) -> Path:
        return self.root / "results" / DATASET

    def model_folder(self, trainer: str, plans: str, configuration: str = "3d_fullres") -> Path:
        return self.results / f"{trainer}__{plans}__{configuration}"

    def run(self, *args: str, env: dict | None = None, check: bool = True,
            timeout: int = 900) -> subprocess.CompletedProcess:
        proc = console_scripts.run(args, {**self.env, **(env or {})}, self.root, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                        f"--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def fingerprint(self, *dataset_ids: int) -> None:
        """nnU-Net's dataset fingerprint, written in this process (one worker) from 1e5 foreground intensities per
        dataset instead of nnU-Net's 1e8, which it samples however small the dataset: most of the planning time of a
        4-channel dataset of 8 tiny cases (37 s, 10 s from 1e5). 1e5 describe these generated intensities as well."""
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
            DatasetFingerprintExtractor,
        )

        from nnunet_kd.tools.bench import _environment

        with _environment(**{k: v for k, v in self.env.items() if k.startswith("nnUNet")}):
            for dataset_id in dataset_ids:
                extractor = DatasetFingerprintExtractor(dataset_id, num_processes=1)
                extractor.num_foreground_voxels_for_intensitystats = 100_000
                extractor.run()

    def plan_and_preprocess(self, *dataset_ids: int, configurations: tuple[str, ...] = ("3d_fullres",)) -> None:
        """nnUNetv2_plan_and_preprocess with one worker process, on the fingerprint written first (`fingerprint`),
        which the command reuses: it recomputes it only with --clean."""
        self.fingerprint(*dataset_ids)
        self.run("nnUNetv2_plan_and_preprocess", "-d", *map(str, dataset_ids), "-c", *configurations, "-np", "1")

    def trainer_in_process(self, monkeypatch, trainer: str, plans: str, env: dict | None = None, fold: int = 0,
                           results: Path | None = None, dataset_id: int = DATASET_ID):
        """The nnU-Net trainer `nnUNetv2_train` would build (on the CPU), in this process, with the workspace's
        nnU-Net variables and `env` set through `monkeypatch`; `results` replaces nnUNet_results."""
        import torch
        from nnunetv2.run.run_training import get_trainer_from_args

        for key, value in {**self.env, **(env or {})}.items():
            if key.startswith("nnUNet"):
                monkeypatch.setenv(key, value)
        if results is not None:
            monkeypatch.setenv("nnUNet_results", str(results))
        return get_trainer_from_args(str(dataset_id), "3d_fullres", fold, trainer, plans, device=torch.device("cpu"))

    def train(self, trainer: str, fold: int | str, plans: str = "nnUNetPlans", configuration: str = "3d_fullres",
              env: dict | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return self.run("nnUNetv2_train", str(DATASET_ID), configuration, str(fold), "-tr", trainer, "-p", plans,
                        "-device", "cpu", *extra, env=env)


# The longest test files, longest first (measured on 2 cores): setup_scripts/test.sh hands whole files to its
# workers in collection order, and starting these first lets the workers finish together. The second needs no
# `workspace`, so that one worker builds it while the other works. Only an order: a file missing here runs after them.
LONGEST_FILES = ("test_teacher_targets", "test_masked_modalities", "test_end_to_end", "test_export",
                 "test_spine_end_to_end", "test_study_end_to_end", "test_barlow_twins_end_to_end", "test_ddp")


def pytest_collection_modifyitems(config, items):
    """`e2e`: tests that drive nnU-Net's CLI on a generated dataset (they use a Workspace, or live in an
    *_end_to_end module), so that `pytest -m "not e2e"` answers in about a minute."""
    for item in items:
        uses_workspace = any(name == "workspace" or name.endswith("_workspace") or name == "spine"
                             for name in getattr(item, "fixturenames", ()))
        if uses_workspace or "end_to_end" in item.module.__name__:
            item.add_marker(pytest.mark.e2e)
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: a file keeps its own order


def _clean_environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update({
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_extTrainer": str(REPO / "trainers"),
        # tiny cases on a 2-core machine that runs two test files at once: one augmentation worker (forked) and one
        # export / evaluation worker, since every worker nnU-Net spawns imports torch and nnU-Net anew
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
        # nnU-Net's CPU training takes every core, and so does the other test worker's: waiting OpenMP threads
        # sleep instead of spinning on a core the other process needs
        "OMP_WAIT_POLICY": "PASSIVE",
        "nnUNet_compile": "false",
        "PYTHONUNBUFFERED": "1",
        # nnU-Net's and our commands live next to this Python, also when its environment is not activated
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    return env


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per test run: with parallel test workers (pytest-xdist) the first
    worker that needs it builds it under a lock and the others wait for it, instead of each building its own."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    folder = shared / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder


def _planned_workspace_with_teacher(root: Path) -> None:
    """The generated dataset, planned and preprocessed (3d_fullres and 2d), w0.25 student plans, and the stock
    nnUNetTrainer (debug schedule) on folds 0 and 1, the latter for the fold-ensemble teacher."""
    ws = Workspace(root, _clean_environment(root))
    write_dataset(root / "raw", DATASET_ID, spec=SyntheticSpec(shape=(24, 32, 32), num_training=10, num_test=2,
                                                              seed=1))
    ws.plan_and_preprocess(DATASET_ID, configurations=("3d_fullres", "2d"))
    ws.run("nnunet_kd", "student-plans", str(DATASET_ID), "-c", "3d_fullres", "2d", "--width", "0.25")
    for fold in (0, 1):
        ws.train("nnUNetTrainer_debug", fold)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    """This test worker's own copy of the planned workspace and its teacher: tests add models to it."""
    built = _built_once(tmp_path_factory, "nnunet_built", _planned_workspace_with_teacher)
    root = tmp_path_factory.mktemp("nnunet")
    for part in ("raw", "preprocessed", "results"):
        shutil.copytree(built / part, root / part)
    return Workspace(root, _clean_environment(root))


@pytest.fixture(scope="session")
def teacher_3d(workspace) -> Path:
    """The stock nnUNetTrainer (debug schedule) on folds 0 and 1, the latter for the fold-ensemble teacher."""
    return workspace.model_folder("nnUNetTrainer_debug", "nnUNetPlans")


@pytest.fixture(scope="session")
def kd_student_3d(workspace, teacher_3d) -> Path:
    """A soft-output KD student (w0.25) on fold 0, taught by the fold-0 teacher."""
    workspace.train("nnUNetTrainerKDLogits_debug", 0, STUDENT_PLANS,
                    env={"nnUNet_KD_teacher": teacher_3d.name})
    return workspace.model_folder("nnUNetTrainerKDLogits_debug", STUDENT_PLANS)


@pytest.fixture(scope="session")
def targets_3d(workspace, teacher_3d) -> Path:
    """The fold-0 debug teacher's targets for every case, written with the CLI (mirroring on, as default)."""
    from nnunet_kd.teachers.stored_targets import MANIFEST, TARGETS_FOLDER

    result = workspace.run("nnunet_kd", "teacher-targets", str(DATASET_ID), "-c", "3d_fullres", "--teacher",
                           teacher_3d.name, "-f", "0", "-device", "cpu")
    assert "nnUNet_KD_teacher_targets=" in result.stdout and "MiB on disk" in result.stdout
    folder = workspace.preprocessed / TARGETS_FOLDER / f"{teacher_3d.name}__f0"
    assert (folder / MANIFEST).is_file()
    return folder


def copy_model_folder(source: Path, destination: Path, folds=(0,)) -> Path:
    """A model folder with the same plans, dataset.json and final checkpoints, to edit for mismatch tests."""
    destination.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(source / name, destination / name)
    for fold in folds:
        (destination / f"fold_{fold}").mkdir()
        shutil.copy(source / f"fold_{fold}" / "checkpoint_final.pth", destination / f"fold_{fold}")
    return destination


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
