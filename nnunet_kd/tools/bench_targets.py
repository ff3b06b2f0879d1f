"""`nnunet_kd bench-targets`: the stored-target formats side by side, on a dataset's own teacher and student.

From one dense targets folder (`nnunet_kd teacher-targets`) it writes each top-k variant (encoded from the stored
float16 log-probabilities, as `teacher-targets --format topk` would from the teacher's float32 ones), then reports per
format: disk per case, nnU-Net's training loader seconds per batch, and, against the dense targets, the KD losses
(soft targets at the trainers' temperatures, logit matching) of a trained student's output on whole cases and the
error of their gradient with respect to the student's logits.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nnunet_kd.losses import LogitMatchingLoss, SoftTargetKDLoss
from nnunet_kd.teachers.compact_targets import decode_top_k
from nnunet_kd.teachers.stored_targets import FORMATS, StoredTargets, _store_case, _write_json_atomically, case_arrays

DENSE = "dense"


def reencode_top_k(dense: StoredTargets, output: Path, top_k: int) -> StoredTargets:
    """`dense`'s targets as top-k targets in `output` (a targets folder of their own, manifest included)."""
    import blosc2

    output.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(dense.manifest))
    manifest.update(format=FORMATS["topk"], top_k=top_k)
    patch_size = manifest["data"]["plans"]["configurations"][manifest["data"]["configuration"]]["patch_size"]
    for identifier in manifest["cases"]:
        log_probs = torch.from_numpy(blosc2.open(str(case_arrays(dense.folder, identifier, dense.manifest)[0]))[:])
        manifest["cases"][identifier] = _store_case(log_probs.float(), identifier, output, manifest, patch_size)
    _write_json_atomically(output / "manifest.json", manifest)
    return StoredTargets(output.resolve(), manifest)


def _decoded(targets: StoredTargets, identifier: str, num_classes: int,
             tail_weights: torch.Tensor | None) -> torch.Tensor:
    import blosc2

    values, *indices = [torch.from_numpy(blosc2.open(str(p))[:])
                        for p in case_arrays(targets.folder, identifier, targets.manifest)]
    if not indices:
        return values.float()
    return decode_top_k(indices[0][None], values[None], num_classes, weights=tail_weights)[0]


def kd_losses(student_logits: torch.Tensor, teacher: torch.Tensor, temperatures: Sequence[float]) -> dict:
    """Each KD loss of the student against the teacher output, and its gradient with respect to the student."""
    losses = {f"soft T={t:g}": SoftTargetKDLoss(t) for t in temperatures} | {"logit matching": LogitMatchingLoss()}
    result = {}
    for name, loss_fn in losses.items():
        student = student_logits.detach().clone().requires_grad_()
        loss = loss_fn(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        result[name] = (float(loss.detach()), grad)
    return result


def _student_predictor(student_model: str, fold: int | str):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's trainer search: keep the table readable
        predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(student_model, (fold,), "checkpoint_final.pth")
    return predictor


def bench_target_formats(dataset: str, configuration: str, plans: str, targets: str, student_model: str,
                         top_ks: Sequence[int] = (2, 4, 8), cases: int = 3, fold: int = 0,
                         temperatures: Sequence[float] = (1.0, 2.0), loader: bool = True, warmup: int = 2,
                         repeats: int = 5) -> dict:
    """Disk, loader seconds per batch and KD loss errors of each top-k format against the dense `targets`."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_kd.tools import dataset_folder
    from nnunet_kd.tools.bench import _environment, _time_loader

    preprocessed = dataset_folder(dataset)
    dense = StoredTargets.locate(targets, preprocessed)
    if dense.manifest["format"] != FORMATS[DENSE]:
        raise ValueError(f"{dense.folder} holds {dense.manifest['format']} targets: bench-targets encodes the other "
                         f"formats from dense ones (nnunet_kd teacher-targets --format dense).")
    num_classes = len(dense.manifest["data"]["labels"])
    data_folder = Path(preprocessed) / dense.manifest["data"]["data_identifier"]
    identifiers = sorted(dense.manifest["cases"])[:cases]
    dataset_class = infer_dataset_class(str(data_folder))
    images = dataset_class(str(data_folder), identifiers)
    with tempfile.TemporaryDirectory() as scratch, _environment(nnUNet_results=os.path.join(scratch, "results")):
        formats = {DENSE: dense} | {f"top-{k}": reencode_top_k(dense, Path(scratch) / f"top{k}", k) for k in top_ks}
        # each top-k format decoded as training decodes it (the tail divided by the profile of every stored case),
        # and with its tail spread evenly, which is what the profile is there to beat
        decodings = {DENSE: (dense, None)}
        for k in top_ks:
            stored = formats[f"top-{k}"]
            decodings |= {f"top-{k}": (stored, stored.tail_weights()), f"top-{k} even tail": (stored, None)}
        rows = {name: {"format": name, "mib_per_case": float(np.mean(
            [t.manifest["cases"][i]["bytes"] for i in t.manifest["cases"]])) / 2 ** 20, "errors": {}}
            for name, (t, _) in decodings.items()}
        predictor = _student_predictor(student_model, fold)
        for identifier in identifiers:
            data = np.asarray(images.load_case(identifier)[0][:], dtype=np.float32)
            student = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
            reference = kd_losses(student, _decoded(dense, identifier, num_classes, None), temperatures)
            for name, (stored, weights) in decodings.items():
                losses = kd_losses(student, _decoded(stored, identifier, num_classes, weights), temperatures)
                for loss_name, (value, grad) in losses.items():
                    dense_value, dense_grad = reference[loss_name]
                    rows[name]["errors"].setdefault(loss_name, []).append(
                        (abs(value / dense_value - 1), float((grad - dense_grad).norm() / dense_grad.norm())))
        if loader:
            for name, stored in formats.items():
                with contextlib.redirect_stdout(io.StringIO()):  # the trainer's log lines go to its log file
                    trainer = get_trainer_from_args(dataset, configuration, fold, "nnUNetTrainerKDLogits", plans,
                                                    device=torch.device("cpu"))
                    trainer.initialize()
                    trainer.prepare_distillation(targets=str(stored.folder))
                    rows[name]["loader_s"] = _time_loader(trainer, warmup, repeats)
                    if name != DENSE:  # the same files and loader: decoding is the train step's, on the device
                        rows[f"{name} even tail"]["loader_s"] = rows[name]["loader_s"]
    dense_mib = rows[DENSE]["mib_per_case"]
    for row in rows.values():
        row["disk_ratio"] = dense_mib / row["mib_per_case"]
        row["errors"] = {loss: {"max_rel_loss_error": max(e[0] for e in errs),
                                "max_rel_grad_error": max(e[1] for e in errs)} for loss, errs in row["errors"].items()}
    return {"dataset": dataset, "configuration": configuration, "plans": plans, "targets": str(dense.folder),
            "num_classes": num_classes, "student": student_model, "cases": identifiers, "rows": list(rows.values())}


def format_target_formats(result: dict) -> str:
    losses = list(result["rows"][0]["errors"])
    header = f"{'format':<18}{'MiB/case':>10}{'less disk':>10}{'load s':>8}" + "".join(
        f"{loss + ' (loss, grad)':>30}" for loss in losses)
    lines = [f"stored-target formats, {result['dataset']} {result['configuration']}, {result['num_classes']} "
             f"classes; KD against dense on {len(result['cases'])} whole cases, student {result['student']}",
             header]
    for row in result["rows"]:
        errors = "".join(f"{100 * e['max_rel_loss_error']:>19.2f} %, {100 * e['max_rel_grad_error']:>5.1f} %"
                         for e in row["errors"].values())
        load = f"{row['loader_s']:>8.3f}" if "loader_s" in row else f"{'':>8}"
        lines.append(f"{row['format']:<18}{row['mib_per_case']:>10.3f}{row['disk_ratio']:>9.1f}x{load}{errors}")
    lines.append("errors: largest over the cases, relative to the dense targets' loss and gradient (w.r.t. the "
                 "student's logits); load s: nnU-Net's training loader, one batch in this process; even tail: the "
                 "same top-k files with the mass outside the top k spread evenly instead of by the tail profile")
    return "\n".join(lines)

