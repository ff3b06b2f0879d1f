"""Commands that run a trained model: its outputs stored as teacher targets, its ONNX export, and prediction from an
export."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError, ensure_ext_trainer
from nnunet_kd.tools import dataset_folder, dataset_name


def _model_folder(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not args.dataset:
        raise KDConfigurationError("Name the model: -m MODEL_FOLDER, or -d DATASET with -tr/-p/-c as for "
                                   "nnUNetv2_predict.")
    return get_output_folder(dataset_name(args.dataset), args.trainer, args.plans, args.configuration)


def export_command(args: argparse.Namespace) -> None:
    from nnunet_kd.deploy.export import export_onnx

    model = _model_folder(args)
    ensure_ext_trainer()
    manifest = export_onnx(model, args.output, args.folds, args.checkpoint, args.force)
    for fold, check in manifest["folds_checked"].items():
        print(f"fold {fold}: {Path(args.output) / f'fold_{fold}' / 'network.onnx'} (largest logit difference to "
              f"torch on a random tile: {check['max_abs_logit_difference']:.2g})")
    print(f"predict with: nnunet_kd predict-onnx -i INPUT_FOLDER -o OUTPUT_FOLDER -m {args.output}")


def predict_onnx_command(args: argparse.Namespace) -> None:
    from nnunet_kd.deploy.batched_prediction import load_onnx_predictor

    predictor = load_onnx_predictor(args.model, args.folds, args.step_size, not args.disable_tta, args.threads,
                                    allow_tqdm=not args.disable_progress_bar, runtime=args.runtime,
                                    precision=args.precision, tile_batch=args.tile_batch)
    Path(args.output).mkdir(parents=True, exist_ok=True)  # as nnUNetv2_predict does; the sequential path expects it
    if args.npp == 0 and args.nps == 0:  # as nnUNetv2_predict: no worker processes to start
        predictor.predict_from_files_sequential(args.input, args.output, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction)
    else:
        predictor.predict_from_files(args.input, args.output, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                     num_processes_segmentation_export=args.nps)


def teacher_targets_command(args: argparse.Namespace) -> None:
    import torch
    from nnunetv2.paths import nnUNet_results

    from nnunet_kd.teachers.frozen import TeacherSpec
    from nnunet_kd.teachers.stored_targets import default_targets_name, summarise, targets_root, write_teacher_targets

    name = dataset_name(args.dataset)
    folder = args.teacher or f"nnUNetTrainer__nnUNetPlans__{args.configuration}"
    if not os.path.isdir(folder) and nnUNet_results.is_set():  # a model folder name, as nnUNet_KD_teacher takes
        folder = os.path.join(nnUNet_results.get(), name, folder)
    folds = args.folds
    if folds is None:  # as nnUNetv2_predict: every fold that has the checkpoint
        folds = sorted(p.parent.name.removeprefix("fold_") for p in Path(folder).glob(f"fold_*/{args.checkpoint}"))
        if not folds:
            raise KDConfigurationError(f"No fold of {folder} has {args.checkpoint}. Train the teacher first, or pass "
                                       f"--teacher / -f / --checkpoint.")
    spec = TeacherSpec(os.path.abspath(folder), tuple(f if f == "all" else int(f) for f in folds), args.checkpoint)
    mirroring = not args.disable_tta
    output = targets_root(dataset_folder(args.dataset)) / (
        args.name or default_targets_name(spec, mirroring, args.format, args.top_k, args.runtime))
    part = f", part {args.part_id + 1} of {args.num_parts}" if args.num_parts > 1 else ""
    print(f"teacher {spec.model_folder}, folds {list(spec.folds)}, mirroring {mirroring}, format {args.format}, "
          f"runtime {args.runtime}{part} -> {output}")
    device = args.device or ("cuda" if args.runtime == "torch" and torch.cuda.is_available() else "cpu")
    manifest = write_teacher_targets(spec, dataset_folder(args.dataset), args.plans, args.configuration, output,
                                     mirroring, args.step_size, device, args.force, target_format=args.format,
                                     top_k=args.top_k, num_parts=args.num_parts, part_id=args.part_id,
                                     tile_batch=args.tile_batch, runtime=args.runtime)
    summary = summarise(manifest)
    stored_as = "float16" if args.format == "dense" else f"top-{args.top_k} float16"
    print(f"{summary['cases']} cases{part and ' in this part'}, {summary['total_mib']:.1f} MiB on disk "
          f"({summary['mean_case_mib']:.2f} MiB per case; float32 uncompressed: {summary['float32_mib']:.1f} MiB). "
          f"{stored_as} against float32: largest error {summary['max_abs_error']:.2g} in {manifest['stored']}, "
          f"{summary['max_abs_probability_error']:.2g} in probabilities (mean "
          f"{summary['mean_abs_probability_error']:.2g}).")
    print(f"train from them{' once every part has run' if part else ''}: nnUNet_KD_teacher_targets={output.name} "
          f"nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr nnUNetTrainerKDLogits -p STUDENT_PLANS")


def add_tile_batch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile-batch", type=int, default=None,
                        help="sliding-window tiles per network call (default: as many as hold ~200,000 voxels, at "
                             "most 32; 1: nnU-Net's own tile-by-tile loop)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """teacher-targets, export and predict-onnx."""
    p = sub.add_parser("teacher-targets", help="run a teacher (a fold or a fold ensemble, with mirroring) once over "
                                               "every preprocessed case and store its outputs, so that KD trainers "
                                               "train without a teacher network (nnUNet_KD_teacher_targets)")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("-c", "--configuration", required=True, help="configuration whose preprocessed data to predict")
    p.add_argument("-p", "--plans", default="nnUNetPlans",
                   help="plans of the preprocessed data: the teacher's or the student's (they share the data; "
                        "default: %(default)s)")
    p.add_argument("--teacher", default=None, help="teacher model folder, or trainer__plans__configuration under "
                                                   "$nnUNet_results/<dataset> (default: nnUNetTrainer__nnUNetPlans__"
                                                   "<configuration>)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="teacher folds, averaged as an ensemble (default: every fold with the checkpoint)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (as nnUNetv2_predict)")
    p.add_argument("-step_size", "--step-size", dest="step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch (default: %(default)s, nnU-Net's)")
    p.add_argument("--name", default=None, help="folder name under $nnUNet_preprocessed/<dataset>/kd_targets "
                                                "(default: <teacher folder>__f<folds>[__nomirror][__top<k>])")
    p.add_argument("--format", default="dense", choices=["dense", "topk"],
                   help="dense: every class's log-probability per voxel; topk: the --top-k most probable classes "
                        "and the mass outside them, divided among the other classes by a per-class tail profile, a "
                        "size that does not grow with the number of classes (softmax tasks; not for logit "
                        "matching; docs/stored-targets.md). Default: %(default)s")
    p.add_argument("--top-k", type=int, default=4, help="classes kept per voxel with --format topk "
                                                        "(default: %(default)s)")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the cases into this many parts, one process each (as nnUNetv2_predict)")
    p.add_argument("-part_id", type=int, default=0, help="which part this process writes (0 .. num_parts - 1)")
    add_tile_batch_argument(p)
    p.add_argument("--runtime", default="torch", choices=["torch", "openvino", "onnxruntime"],
                   help="torch: nnU-Net's network, targets to the bit those of nnU-Net's prediction (default); "
                        "openvino: on a CPU, the teacher exported to ONNX for this call and run by OpenVINO, measured "
                        "faster, targets within float rounding of torch's (docs/stored-targets.md)")
    p.add_argument("-device", "--device", dest="device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available")
    p.add_argument("--force", action="store_true", help="replace targets of another teacher or settings under the "
                                                        "same name")
    p.set_defaults(func=teacher_targets_command)

    p = sub.add_parser("export", help="write a trained model (e.g. a KD student) as ONNX for deployment; predict it "
                                      "with predict-onnx, without torch networks, trainers or the teacher")
    p.add_argument("-m", "--model", default=None, help="trained model folder (trainer__plans__configuration)")
    p.add_argument("-d", "--dataset", default=None, help="or: dataset name or id, with -tr, -p, -c")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to export (default: every trained fold)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-o", "--output", required=True, help="export folder (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in the output folder")
    p.set_defaults(func=export_command)

    p = sub.add_parser("predict-onnx", help="nnU-Net's prediction (preprocessing, sliding window, mirroring, export) "
                                            "with an exported ONNX model on the CPU; flags as for nnUNetv2_predict")
    p.add_argument("-i", "--input", required=True, help="folder of images in nnU-Net naming (_0000...)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-m", "--model", required=True, help="folder written by `nnunet_kd export`")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="default: every exported fold (averaged)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (faster; see README for its Dice cost)")
    p.add_argument("-npp", type=int, default=3, help="preprocessing processes (default: 3; 0 with -nps 0: none)")
    p.add_argument("-nps", type=int, default=3, help="segmentation export processes (default: 3; 0 with -npp 0: "
                                                     "none, one case after the other in this process)")
    p.add_argument("--threads", type=int, default=None, help="the runtime's threads (default: its own choice)")
    p.add_argument("--runtime", default=None, help="openvino or onnxruntime (default: openvino where installed, "
                                                   "measured faster: pip install 'nnunet-kd[openvino]')")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                   help="bf16: OpenVINO's bfloat16 convolutions, about 2.5x faster on CPUs with bfloat16 units (AMX, "
                        "AVX512_BF16); moves a few border voxels (docs/deployment.md). Default: f32")
    add_tile_batch_argument(p)
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already predicted")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.set_defaults(func=predict_onnx_command)
