"""Every trainer under DDP (`nnUNetv2_train ... -num_gpus N`), on the CPU.

nnU-Net runs DDP on CUDA only, so this test runs what each rank of `-num_gpus 2` runs (nnU-Net's trainer objects,
built by nnU-Net's own `get_trainer_from_args`: the start, the steps, the epoch ends, the checkpoints and a `--c`
resume) in a 2-process `gloo` group on the CPU, each rank fed its half of the global batches that one process trains
on alone. Every rank must log the loss parts of the global batch, hold the global batch's gradients after DDP's
all-reduce, and write checkpoints that hold the student alone; `--c` must restore every rank's state exactly.

Every process trains in float64 at a learning rate of 1e-4, so that what is left is the difference nnU-Net's DDP
makes itself: a weight of 1e-6 instead of 0 for the lowest deep-supervision output (~2e-6 in the gradients). Measured
otherwise: in float32, the rounding that differs with how a batch is split reached 5e-4 in Barlow Twins' fourth
step's gradients; at nnU-Net's 0.01 in float64, 3e-4 in class-affinity KD's third step's, and weights near 0 differed
beyond 1e-5 after four steps.

The dataset is generated, then fingerprinted, planned and preprocessed by nnU-Net's Python API (the fixture is named
`*_workspace`, so the suite marks these tests `e2e`); the output-space trainers' teacher is an untrained nnU-Net
model folder of the student's size.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Workspace, _clean_environment
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nnunet_kd.core.checkpoints import load_checkpoint
from nnunet_kd.core.run_core import kd_state_file
from nnunet_kd.data.synthetic import SyntheticSpec
from nnunet_kd.data.synthetic_multimodal import write_multimodal_dataset
from nnunet_kd.tools.bench import _environment

DATASET_ID = 945
DATASET = f"Dataset{DATASET_ID}_KDSyntheticMultiModal"
PLANS = "nnUNetPlans_KDStudent_w0.25"
WORLD_SIZE = 2
# two epochs of two steps, with a --c between them; the same initial weights in every process
SCHEDULE = {"nnUNet_KD_seed": "0", "nnUNet_KD_num_epochs": "2", "nnUNet_KD_iterations_per_epoch": "2",
            "nnUNet_KD_val_iterations_per_epoch": "1"}
TEACHER = f"teacher/{DATASET}/nnUNetTrainer__{PLANS}__3d_fullres"  # under the workspace root
TRAINERS = {
    "nnUNetTrainerStudent": {},
    "nnUNetTrainerKDLogits": {"nnUNet_KD_teacher": TEACHER},
    "nnUNetTrainerKDLogitMatching": {"nnUNet_KD_teacher": TEACHER},
    "nnUNetTrainerKDClassAffinity": {"nnUNet_KD_teacher": TEACHER},
    "nnUNetTrainerKDMultiScale": {"nnUNet_KD_teacher": TEACHER},
    # with a projector, so that a third module trains beside student and teacher
    "nnUNetTrainerKDBarlowTwins": {"nnUNet_KD_student_channels": "FLAIR,T1CE", "nnUNet_KD_projector_dim": "8"},
    # the growth at the second epoch happens after the --c
    "nnUNetTrainerKDGrowingAssistant": {"nnUNet_KD_teacher": TEACHER, "nnUNet_KD_max_width": "2"},
}
# the trainer's attributes that are DDP wrappers on every rank, where not nnU-Net's student wrapper alone
WRAPPED = {"nnUNetTrainerKDBarlowTwins": ["network", "synced_barlow_twins", "synced_teacher"],
           "nnUNetTrainerKDGrowingAssistant": ["network", "sliced"]}
# what every rank logs per epoch, besides each trainer's own train_<part>
NNUNET_LOGGED = ("train_losses", "val_losses", "mean_fg_dice")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # float64: the networks nnU-Net builds from here on
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _trainer_environment(root: Path, name: str) -> dict:
    env = {**SCHEDULE, **TRAINERS[name]}
    if "nnUNet_KD_teacher" in env:
        env["nnUNet_KD_teacher"] = str(root / env["nnUNet_KD_teacher"])
    return env


# ---------------------------------------------------------------- the run every process makes, DDP rank or not
def _gradients(trainer) -> torch.Tensor:
    """Everything the optimiser trains, after the step: the gradients it used (after DDP's all-reduce)."""
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in trained])


def _state(trainer) -> list[torch.Tensor]:
    """What a resumed run must have restored: the student, everything the optimiser trains and its momentum."""
    student = trainer.network.module if trainer.is_ddp else trainer.network
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    # one process never steps the lowest deep-supervision output (weight 0), so it has no momentum there
    momentum = [m for p in trained if (m := trainer.optimizer.state.get(p, {}).get("momentum_buffer")) is not None]
    return [t.detach().clone() for t in (*student.state_dict().values(), *trained, *momentum)]


def _epoch(trainer, train_batches: list[dict], val_batch: dict, record: dict) -> None:
    """nnU-Net's run_training for one epoch, with these batches instead of its loaders'."""
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outputs = []
    for batch in train_batches:
        outputs.append(trainer.train_step(batch))
        record["steps"].append({"parts": {k: float(np.mean(v)) for k, v in outputs[-1].items()},
                                "gradients": _gradients(trainer)})
    trainer.on_train_epoch_end(outputs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(val_batch)])
    logged = trainer.logger.local_logger.my_fantastic_logging
    record["logged"].append({k: float(np.mean(logged[k][-1])) for k in logged
                             if k.startswith("train_") or k in NNUNET_LOGGED})
    trainer.on_epoch_end()


def _run(build, batches: dict) -> dict:
    """One epoch, a `--c` resume in a new trainer (as nnU-Net's maybe_load_checkpoint finds the checkpoint), the
    second epoch and the end of training."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    record = {"steps": [], "logged": []}
    trainer = build(continue_training=False)
    trainer.on_train_start()
    _epoch(trainer, batches["train"][:2], batches["val"][0], record)
    before = _state(trainer)
    if dist.is_initialized():
        dist.barrier()  # rank 0 wrote the checkpoint the others resume from
    trainer = build(continue_training=True)
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    record["resumed_at_epoch"] = trainer.current_epoch
    record["resumed_exactly"] = all(torch.equal(a, b) for a, b in zip(before, _state(trainer), strict=True))
    trainer.on_train_start()
    _epoch(trainer, batches["train"][2:], batches["val"][1], record)
    trainer.on_train_end()
    wrappers = {k: v for k, v in vars(trainer).items() if isinstance(v, DistributedDataParallel)}
    record["ddp_wrapped"] = sorted(wrappers)
    wrapped = {id(p) for wrapper in wrappers.values() for p in wrapper.parameters()}
    teacher = getattr(trainer, "teacher", None)
    record["teacher_wrapped"] = teacher is not None and any(id(p) in wrapped for p in teacher.parameters())
    if getattr(trainer, "channels", None) is not None:
        # perform_actual_validation's first call, with the student fed its channels: under DDP nnU-Net reaches the
        # deep-supervision switch through `self.network.module`
        from nnunet_kd.students.modalities import SelectChannels

        student = trainer.network
        trainer.network = SelectChannels(student, trainer.channels.indices)
        trainer.set_deep_supervision_enabled(False)
        record["deep_supervision_after_switch_off"] = getattr(student, "module", student).decoder.deep_supervision
    record["output_folder"] = trainer.output_folder
    return record


def _trainer(name: str, continue_training: bool, device: torch.device):
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, PLANS, continue_training, device=device)
    trainer.initial_lr = 1e-4  # see the module's docstring
    build_loaders = trainer.get_dataloaders

    def get_dataloaders():
        # nnU-Net's augmentation (its blur kernels) follows the default dtype; it runs in float32 as in its workers
        with _default_dtype(torch.float32):
            return build_loaders()

    trainer.get_dataloaders = get_dataloaders
    return trainer


# ---------------------------------------------------------------- a DDP rank
def _cpu_ddp(module: torch.nn.Module, device_ids=None, **kwargs) -> DistributedDataParallel:
    # nnU-Net's initialize passes device_ids=[rank], which DDP takes only for a module on that GPU
    return DistributedDataParallel(module, **kwargs)


def _ddp_trainer(name: str, continue_training: bool):
    trainer = _trainer(name, continue_training, torch.device("cuda"))
    # nnU-Net puts rank r on cuda:r (and a gradient scaler with it); these ranks are CPU processes
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    return trainer


def _share(batch: dict, rank: int) -> dict:
    """This rank's samples of a global batch: nnU-Net gives rank r the r-th equal part."""
    size = batch["data"].shape[0] // WORLD_SIZE
    part = slice(rank * size, (rank + 1) * size)
    return {"data": batch["data"][part], "target": [t[part] for t in batch["target"]]}


def _rank(rank: int, root: str, results: str) -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    nnunet_trainer_module.DDP = _cpu_ddp
    batches = torch.load(Path(root) / "batches.pt")
    mine = {k: [_share(b, rank) for b in v] for k, v in batches.items()}
    records = {}
    for name in TRAINERS:
        with _environment(**_trainer_environment(Path(root), name)):
            records[name] = _run(lambda continue_training, n=name: _ddp_trainer(n, continue_training), mine)
    torch.save(records, Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ddp_workspace(tmp_path_factory) -> Workspace:
    """A generated 4-channel dataset, planned and preprocessed with nnU-Net's API (one worker each), w0.25 student
    plans, an untrained teacher model folder, and the global batches from nnU-Net's own loader."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset

    from nnunet_kd.students.plans import make_student_plans, write_plans

    root = tmp_path_factory.mktemp("ddp")
    ws = Workspace(root, _clean_environment(root))
    write_multimodal_dataset(root / "raw", DATASET_ID, spec=SyntheticSpec(shape=(8, 24, 24), num_training=5,
                                                                         num_test=0, seed=4))
    nnunet_env = {k: v for k, v in ws.env.items() if k.startswith("nnUNet")}
    with _environment(**nnunet_env):
        ws.fingerprint(DATASET_ID)
        plan_experiment_dataset(DATASET_ID)
        preprocess_dataset(DATASET_ID, configurations=["3d_fullres"], num_processes=[1], show_progress_bar=False)
        preprocessed = root / "preprocessed" / DATASET
        plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
        write_plans(make_student_plans(plans, ["3d_fullres"], 0.25), preprocessed)
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())

    # the SingleThreadedAugmenter from here on: the test feeds the steps itself
    with _environment(**{**nnunet_env, "nnUNet_n_proc_DA": "0", "nnUNet_results": str(root / "teacher")}):
        teacher = _trainer("nnUNetTrainer", False, torch.device("cpu"))
        # its random weights the same whatever ran before in this process: with some draws, the growing assistant's
        # one-process and DDP runs differ by more than the tolerances below (a suite order found one)
        torch.manual_seed(0)
        teacher.initialize()
        teacher.save_checkpoint(os.path.join(teacher.output_folder, "checkpoint_final.pth"))
        save_json(teacher.plans_manager.plans, os.path.join(teacher.output_folder_base, "plans.json"))
        save_json(dataset_json, os.path.join(teacher.output_folder_base, "dataset.json"))

        torch.manual_seed(0)
        np.random.seed(0)  # nnU-Net's loader and augmentation draw from these in this process
        train, val = teacher.get_dataloaders()
        batches = {"train": [next(train) for _ in range(4)], "val": [next(val) for _ in range(2)]}
        assert all(b["data"].shape[0] == WORLD_SIZE for b in batches["train"])  # one case per rank
        torch.save({k: [{"data": b["data"].double(), "target": b["target"]} for b in v] for k, v in batches.items()},
                   root / "batches.pt")
    ws.env["nnUNet_n_proc_DA"] = "0"
    return ws


@pytest.fixture(scope="module")
def runs(ddp_workspace) -> dict:
    """Each trainer's run in one process on the global batches, and in two DDP ranks on their halves."""
    root = ddp_workspace.root
    batches = torch.load(root / "batches.pt")
    nnunet_env = {k: v for k, v in ddp_workspace.env.items() if k.startswith("nnUNet")}
    reference = {}
    for name in TRAINERS:
        with _default_dtype(torch.float64), _environment(**{**nnunet_env, "nnUNet_results": str(root / "one_process"),
                                       **_trainer_environment(root, name)}):
            reference[name] = _run(lambda continue_training, n=name: _trainer(n, continue_training,
                                                                              torch.device("cpu")), batches)
    results = root / "ranks"
    results.mkdir()
    with _environment(**{**nnunet_env, "nnUNet_results": str(root / "ddp")}):
        torch.multiprocessing.spawn(_rank, args=(str(root), str(results)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {name: {"one_process": reference[name], "ranks": [r[name] for r in ranks]} for name in TRAINERS}


# ---------------------------------------------------------------- the checks
def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _close(value: float, expected: float, loss: float) -> bool:
    # a part near 0 (the growing assistant's student-assistant KL right after growth) is compared with the whole loss
    return value == pytest.approx(expected, rel=1e-5, abs=1e-7 * abs(loss))


@pytest.mark.parametrize("name", TRAINERS)
def test_every_step_returns_the_loss_parts_of_the_global_batch(runs, name):
    one, ranks = runs[name]["one_process"], runs[name]["ranks"]
    assert len(one["steps"]) == 4 and all(len(r["steps"]) == 4 for r in ranks)
    for step, expected in enumerate(one["steps"]):
        parts = [r["steps"][step]["parts"] for r in ranks]
        assert parts[0].keys() == parts[1].keys() == expected["parts"].keys()
        # the ranks trained on different cases: agreeing with one process is not agreeing by accident
        assert parts[0]["loss"] != parts[1]["loss"]
        for part, value in expected["parts"].items():
            mean = float(np.mean([p[part] for p in parts]))
            assert _close(mean, value, expected["parts"]["loss"]), (step, part, [p[part] for p in parts], value)


@pytest.mark.parametrize("name", TRAINERS)
def test_gradients_after_the_all_reduce_are_the_global_batch_gradients(runs, name):
    one, ranks = runs[name]["one_process"], runs[name]["ranks"]
    for step, expected in enumerate(one["steps"]):
        gradients = [r["steps"][step]["gradients"] for r in ranks]
        assert torch.equal(gradients[0], gradients[1]), f"step {step}: the ranks hold different gradients"
        # nnU-Net's 1e-6 weight for the lowest output under DDP, and sums in another order
        assert _relative_difference(gradients[0], expected["gradients"]) < 1e-5, step


@pytest.mark.parametrize("name", TRAINERS)
def test_epoch_ends_log_the_means_over_all_ranks_and_steps(runs, name):
    one, ranks = runs[name]["one_process"], runs[name]["ranks"]
    for epoch, expected in enumerate(one["logged"]):
        logged = ranks[0]["logged"][epoch]
        assert logged == ranks[1]["logged"][epoch]
        assert logged.keys() == expected.keys()
        steps = [r["steps"][2 * epoch + i]["parts"] for r in ranks for i in range(2)]
        for key, value in logged.items():
            if key.startswith("train_") and key != "train_losses":
                assert value == pytest.approx(np.mean([s[key.removeprefix("train_")] for s in steps]), rel=1e-6)
        for key in logged:
            assert _close(logged[key], expected[key], expected["train_losses"]), (epoch, key)


@pytest.mark.parametrize("name", TRAINERS)
def test_checkpoints_hold_the_student_alone_and_resume_restores_every_rank(runs, name):
    one, ranks = runs[name]["one_process"], runs[name]["ranks"]
    assert one["resumed_at_epoch"] == ranks[0]["resumed_at_epoch"] == ranks[1]["resumed_at_epoch"] == 1
    assert one["resumed_exactly"] and ranks[0]["resumed_exactly"] and ranks[1]["resumed_exactly"]
    final = Path(ranks[0]["output_folder"]) / "checkpoint_final.pth"
    expected_final = Path(one["output_folder"]) / "checkpoint_final.pth"
    written, expected = load_checkpoint(final), load_checkpoint(expected_final)
    assert written["network_weights"].keys() == expected["network_weights"].keys()  # no DDP `module.` prefix
    for key, value in expected["network_weights"].items():
        assert torch.allclose(written["network_weights"][key], value, rtol=1e-5, atol=1e-8), key
    assert written["current_epoch"] == expected["current_epoch"] == 2
    companion, expected_companion = kd_state_file(str(final)), kd_state_file(str(expected_final))
    assert os.path.exists(companion) == os.path.exists(expected_companion)
    if os.path.exists(expected_companion):
        # the teacher and projector, or the master, as the second epoch left them on every rank
        state, expected_state = load_checkpoint(companion), load_checkpoint(expected_companion)
        assert state.keys() == expected_state.keys()
        for section, weights in expected_state.items():
            if section.endswith("_weights"):
                assert state[section].keys() == weights.keys()
                for key, value in weights.items():
                    assert torch.allclose(state[section][key], value, rtol=1e-5, atol=1e-8), (section, key)
            else:
                assert state[section] == weights, section


@pytest.mark.parametrize("name", TRAINERS)
def test_ddp_wraps_what_the_method_trains_and_leaves_a_frozen_teacher_outside(runs, name):
    one, ranks = runs[name]["one_process"], runs[name]["ranks"]
    assert one["ddp_wrapped"] == [] and not one["teacher_wrapped"]
    for rank in ranks:
        assert rank["ddp_wrapped"] == WRAPPED.get(name, ["network"])
        # Barlow Twins' teacher trains with the student; the output-space trainers' teacher is frozen
        assert rank["teacher_wrapped"] == (name == "nnUNetTrainerKDBarlowTwins")


def test_the_deep_supervision_switch_reaches_a_channel_selected_student_under_ddp(runs):
    ranks = runs["nnUNetTrainerKDBarlowTwins"]["ranks"]
    assert [r["deep_supervision_after_switch_off"] for r in ranks] == [False, False]
