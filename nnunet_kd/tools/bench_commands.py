"""Benchmark commands (`nnunet_kd bench ...`) and the results report of a dataset's trained models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError, ensure_ext_trainer
from nnunet_kd.tools import dataset_name, default_teacher, use_demo_workspace_if_unset

DEFAULT_STEP_TRAINERS = ["nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "nnUNetTrainerKDLogitMatching",
                         "nnUNetTrainerKDClassAffinity", "nnUNetTrainerKDMultiScale"]


def bench_step_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.bench import bench_step, format_step

    use_demo_workspace_if_unset(args.workdir)
    ensure_ext_trainer()
    teacher = args.teacher or default_teacher(args.dataset, args.configuration)
    result = bench_step(args.dataset, args.configuration, args.plans, args.trainers, teacher, args.device,
                        args.warmup, args.repeats, teacher_folds=args.teacher_folds,
                        teacher_targets=args.teacher_targets, loader=args.loader)
    print(format_step(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def bench_infer_command(args: argparse.Namespace) -> None:
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_kd.tools.bench import bench_infer, format_infer

    file_ending = json.loads((Path(args.models[0]) / "dataset.json").read_text())["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(args.images, file_ending)[:args.cases]
    if not cases:
        raise KDConfigurationError(f"No images ending in {file_ending} in {args.images}.")
    folds = tuple(f if f == "all" else int(f) for f in args.folds)
    result = bench_infer(args.models, cases, args.device, folds)
    print(format_infer(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def bench_predict_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.bench_predict import bench_predict, format_predict, parse_variants

    result = bench_predict(args.models, args.images, parse_variants(args.variants), args.labels, args.repeats,
                           args.folds, stages=not args.no_stages)
    _print_table(format_predict(result), result, args)


def bench_runtimes_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.bench_runtimes import bench_runtimes, format_runtimes

    result = bench_runtimes(args.model, args.images, args.export, args.runtimes, args.tile_batches, args.cases,
                            args.mirroring, args.folds)
    _print_table(format_runtimes(result), result, args)


def _print_table(table: str, result: dict, args: argparse.Namespace) -> None:
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def bench_targets_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.bench_targets import bench_target_formats, format_target_formats

    ensure_ext_trainer()
    result = bench_target_formats(args.dataset, args.configuration, args.plans, args.targets, args.student,
                                  args.top_k, args.cases, loader=not args.no_loader, repeats=args.repeats)
    table = format_target_formats(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def report_command(args: argparse.Namespace) -> None:
    from nnunetv2.paths import nnUNet_results

    from nnunet_kd.tools.results import report

    use_demo_workspace_if_unset(args.workdir)
    if not nnUNet_results.is_set():
        raise KDConfigurationError(f"nnUNet_results is not set and there is no demo workspace at "
                                   f"{Path(args.workdir).resolve()} (--workdir is relative to the current folder). "
                                   f"Export nnU-Net's folders, or pass --workdir with the demo's folder.")
    dataset = dataset_name(args.dataset)
    table = f"## {dataset}\n\n" + report(Path(nnUNet_results.get()) / dataset, args.device, args.time_cases)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """bench (step, infer, targets, runtimes, predict) and report."""
    p = sub.add_parser("bench", help="benchmarks: training-step cost of KD, inference speed")
    bench = p.add_subparsers(dest="bench_command", required=True)

    p = bench.add_parser("step", help="time train steps of the plain student and each KD trainer, interleaved")
    p.add_argument("dataset", nargs="?", default="900", help="dataset (default: the demo's, 900)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans_KDStudent_w0.25", help="student plans")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_STEP_TRAINERS,
                   help="first one is the reference (plain student)")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: the stock or demo teacher)")
    p.add_argument("--teacher-folds", nargs="+", default=None, help="online teacher folds, averaged as an ensemble "
                                                                    "(default: fold 0)")
    p.add_argument("--teacher-targets", default=None, help="stored targets (`nnunet_kd teacher-targets`): also time "
                                                           "every KD trainer learning from them, and the loaders")
    p.add_argument("--loader", action="store_true", help="also time nnU-Net's training data loader per batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default="nnunet_kd_demo", help="demo folder used when nnUNet_results is unset")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=bench_step_command)

    p = bench.add_parser("infer", help="stock nnUNetPredictor speed, size, FLOPs and memory of trained models")
    p.add_argument("models", nargs="+", help="trained model folders (trainer__plans__configuration); ratios are "
                                             "relative to the first")
    p.add_argument("-i", "--images", required=True, help="folder of images in nnU-Net naming (_0000...)")
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("-f", "--folds", nargs="+", default=["0"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None)
    p.set_defaults(func=bench_infer_command)

    p = bench.add_parser("targets", help="stored-target formats side by side: disk, loader seconds per batch, and "
                                         "KD loss and gradient errors of top-k against dense targets")
    p.add_argument("dataset", help="dataset name or id")
    p.add_argument("--targets", required=True, help="dense targets (`nnunet_kd teacher-targets`), a name or folder")
    p.add_argument("--student", required=True, help="a trained student model folder: its logits on whole cases "
                                                    "are scored against each format")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-p", "--plans", required=True, help="the student's plans")
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="loader batches timed per format (median)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader timing")
    p.add_argument("--json", default=None)
    p.set_defaults(func=bench_targets_command)

    p = bench.add_parser("runtimes", help="the network stage of prediction under each runtime (torch, OpenVINO, "
                                          "ONNX Runtime) and tiles per call, against nnU-Net's own loop")
    p.add_argument("model", help="a trained model folder")
    p.add_argument("--export", default=None, help="its `nnunet_kd export` folder (for openvino and onnxruntime)")
    p.add_argument("-i", "--images", required=True, help="folder of images in nnU-Net naming (_0000...)")
    p.add_argument("--runtimes", nargs="+", default=["torch", "openvino", "onnxruntime"],
                   help="of torch, torch-stock, openvino, onnxruntime (default: %(default)s)")
    p.add_argument("--tile-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--mirroring", action="store_true", help="with test-time mirroring (default: off)")
    p.add_argument("-f", "--folds", nargs="+", default=["0"])
    p.add_argument("-o", "--output", default=None, help="also write the Markdown table here")
    p.add_argument("--json", default=None)
    p.set_defaults(func=bench_runtimes_command)

    p = bench.add_parser("predict", help="whole prediction commands (stock nnUNetv2_predict, or predict-onnx for an "
                                         "export) side by side: call, start-up, per case, stages, Dice of each flag")
    p.add_argument("models", nargs="+", help="trained model folders and/or `nnunet_kd export` folders; speed-ups are "
                                             "relative to the first; MODEL::FLAGS adds flags to one model's calls, "
                                             "e.g. 'TEACHER_DIR::-f 0 1 2 3 4' (its own folds)")
    p.add_argument("-i", "--images", required=True, help="folder of images in nnU-Net naming (_0000...)")
    p.add_argument("-l", "--labels", default=None, help="their reference segmentations: score every call's output")
    p.add_argument("--variants", default="defaults; --disable_tta",
                   help="prediction flags to compare, separated by ';', 'defaults' for none, e.g. "
                        "'defaults; --disable_tta; --disable_tta -step_size 0.75; -npp 1 -nps 1' "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="calls per model and variant (median; default: 3)")
    p.add_argument("-f", "--folds", nargs="+", default=["0"])
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage split")
    p.add_argument("-o", "--output", default=None, help="also write the Markdown table here")
    p.add_argument("--json", default=None)
    p.set_defaults(func=bench_predict_command)

    p = sub.add_parser("report", help="Markdown table of every trained model of a dataset (validation Dice, size, "
                                      "speed, KD gap closed)")
    p.add_argument("dataset", nargs="?", default="900")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--time-cases", type=int, default=2, help="validation cases to time per model (0: skip)")
    p.add_argument("--workdir", default="nnunet_kd_demo", help="demo folder used when nnUNet_results is unset")
    p.add_argument("-o", "--output", default=None, help="also write the table to this file")
    p.set_defaults(func=report_command)
