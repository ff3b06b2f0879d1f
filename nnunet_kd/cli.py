"""`nnunet_kd` command line: student plans, the generated datasets, channel subsets, and the end-to-end demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunet_kd.errors import KDConfigurationError


def _dataset_folder(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise KDConfigurationError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    folder = Path(nnUNet_preprocessed.get()) / maybe_convert_to_dataset_name(dataset)
    if not folder.is_dir():
        raise KDConfigurationError(f"{folder} does not exist. Run `nnUNetv2_plan_and_preprocess -d {dataset}` first.")
    return folder


def student_plans_command(args: argparse.Namespace) -> None:
    from nnunet_kd.plans import count_parameters, make_student_plans, write_plans

    folder = _dataset_folder(args.dataset)
    teacher_plans_file = folder / f"{args.plans}.json"
    if not teacher_plans_file.is_file():
        raise KDConfigurationError(f"{teacher_plans_file} not found. Plan the dataset with these plans first, or pass "
                                   f"-p with one of {sorted(p.stem for p in folder.glob('*Plans*.json'))}.")
    teacher_plans = json.loads(teacher_plans_file.read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    if args.width is None:
        if args.arch is None and args.stages is None and args.convs is None:
            raise KDConfigurationError("Nothing to make smaller: give --width, --stages, --convs and/or --arch.")
        args.width = 1.0
    student = make_student_plans(teacher_plans, args.configurations, args.width, args.stages, args.convs,
                                 args.min_features, args.name, args.arch)
    path, written = write_plans(student, folder, args.force)
    print(f"{'wrote' if written else 'unchanged (identical file exists)'}: {path}")
    print(f"{'configuration':<16}{'teacher params':>16}{'student params':>16}{'ratio':>8}  student features_per_stage")
    for configuration in args.configurations:
        n_teacher = count_parameters(teacher_plans, configuration, dataset_json)
        n_student = count_parameters(student, configuration, dataset_json)
        features = student["configurations"][configuration]["architecture"]["arch_kwargs"]["features_per_stage"]
        print(f"{configuration:<16}{n_teacher:>16,}{n_student:>16,}{n_student / n_teacher:>8.3f}  {features}")
    print(f"\nTrain a student with: nnUNetv2_train {args.dataset} {args.configurations[0]} FOLD "
          f"-tr nnUNetTrainerKDLogits -p {student['plans_name']}")


def _raw_folder(raw: str | None) -> str:
    raw = raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise KDConfigurationError("Give --raw or export nnUNet_raw.")
    return raw


def generate_dataset_command(args: argparse.Namespace) -> None:
    from nnunet_kd.synthetic import SyntheticSpec, write_dataset
    from nnunet_kd.synthetic_multimodal import write_multimodal_dataset

    raw = _raw_folder(args.raw)
    spec = SyntheticSpec(num_training=args.num_training, num_test=args.num_test, seed=args.seed,
                         **({"shape": tuple(args.shape)} if args.shape else {}))
    if args.multimodal:
        print(f"wrote {write_multimodal_dataset(raw, args.dataset_id or 910, spec=spec)}")
    else:
        print(f"wrote {write_dataset(raw, args.dataset_id or 900, spec=spec)}")


def subset_channels_command(args: argparse.Namespace) -> None:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_kd.modalities import subset_raw_dataset

    raw = Path(_raw_folder(args.raw))
    try:
        source = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        raise KDConfigurationError(f"Dataset {args.dataset} not found in {raw}.") from e
    name = args.name or f"{source.split('_', 1)[1]}_{''.join(c.strip() for c in args.channels.split(','))}"
    print(f"wrote {subset_raw_dataset(raw / source, raw / f'Dataset{args.dataset_id:03d}_{name}', args.channels)}")


DEFAULT_STEP_TRAINERS = ["nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "nnUNetTrainerKDLogitMatching",
                         "nnUNetTrainerKDClassAffinity", "nnUNetTrainerKDMultiScale"]


def _use_demo_workspace_if_unset(workdir: str) -> None:
    """Benchmarks default to the demo's dataset: point nnU-Net at the demo's folders unless the user set them."""
    from nnunet_kd.demo import workspace_environment

    if not os.environ.get("nnUNet_results") and Path(workdir).is_dir():
        os.environ.update(workspace_environment(Path(workdir).resolve()))


def _default_teacher(dataset: str, configuration: str) -> str:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_results.is_set():
        raise KDConfigurationError("nnUNet_results is not set; export it or run `nnunet_kd demo` first.")
    folder = Path(nnUNet_results.get()) / maybe_convert_to_dataset_name(dataset)
    for trainer in ("nnUNetTrainer", "nnUNetTrainer_demo"):
        candidate = folder / f"{trainer}__nnUNetPlans__{configuration}"
        if candidate.is_dir():
            return str(candidate)
    raise KDConfigurationError(f"No teacher in {folder}; pass --teacher MODEL_FOLDER.")


def bench_step_command(args: argparse.Namespace) -> None:
    from nnunet_kd.bench import bench_step, format_step

    _use_demo_workspace_if_unset(args.workdir)
    teacher = args.teacher or _default_teacher(args.dataset, args.configuration)
    result = bench_step(args.dataset, args.configuration, args.plans, args.trainers, teacher, args.device,
                        args.warmup, args.repeats)
    print(format_step(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def bench_infer_command(args: argparse.Namespace) -> None:
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_kd.bench import bench_infer, format_infer

    file_ending = json.loads((Path(args.models[0]) / "dataset.json").read_text())["file_ending"]
    cases = create_lists_from_splitted_dataset_folder(args.images, file_ending)[:args.cases]
    if not cases:
        raise KDConfigurationError(f"No images ending in {file_ending} in {args.images}.")
    folds = tuple(f if f == "all" else int(f) for f in args.folds)
    result = bench_infer(args.models, cases, args.device, folds)
    print(format_infer(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def report_command(args: argparse.Namespace) -> None:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_kd.bench import report

    _use_demo_workspace_if_unset(args.workdir)
    if not nnUNet_results.is_set():
        raise KDConfigurationError("nnUNet_results is not set; export it or run `nnunet_kd demo` first.")
    dataset = maybe_convert_to_dataset_name(args.dataset)
    table = f"## {dataset}\n\n" + report(Path(nnUNet_results.get()) / dataset, args.device, args.time_cases)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


def demo_command(args: argparse.Namespace) -> None:
    from nnunet_kd.demo import run_demo

    run_demo(Path(args.workdir), args.device, fresh=args.fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet_kd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("student-plans", help="write compact student plans derived from existing nnU-Net plans")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="configurations to include (default: 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="teacher plans identifier (default: nnUNetPlans)")
    p.add_argument("--width", type=float, default=None, help="multiply features_per_stage by this, e.g. 0.25 "
                   "(default 1 when --arch, --stages or --convs is given)")
    p.add_argument("--arch", default=None, choices=["plain", "lcovnet"],
                   help="student architecture (default: the teacher plans' own); lcovnet: LCOV-Net (Zhao et al. 2023)")
    p.add_argument("--stages", type=int, default=None, help="keep only the first N resolution stages")
    p.add_argument("--convs", type=int, default=None, help="convolutions (or residual blocks) per stage")
    p.add_argument("--min-features", type=int, default=4, help="floor for features per stage (default: 4)")
    p.add_argument("--name", default=None,
                   help="plans identifier (default: <plans>_KDStudent[_<arch>]_w<width>[_s][_c])")
    p.add_argument("--force", action="store_true", help="replace an existing, different plans file of that name")
    p.set_defaults(func=student_plans_command)

    p = sub.add_parser("generate-dataset", help="write the generated demo dataset in nnU-Net raw format")
    p.add_argument("--raw", default=None, help="raw data folder (default: $nnUNet_raw)")
    p.add_argument("--dataset-id", type=int, default=None, help="default: 900, or 910 with --multimodal")
    p.add_argument("--num-training", type=int, default=24)
    p.add_argument("--num-test", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="volume shape in voxels (default: 40 56 56)")
    p.add_argument("--multimodal", action="store_true",
                   help="4 channels T1, T2, FLAIR, T1CE (for nnUNetTrainerKDBarlowTwins: a student on FLAIR,T1CE "
                        "lacks T2, which shows the lesions)")
    p.set_defaults(func=generate_dataset_command)

    p = sub.add_parser("subset-channels", help="copy a raw dataset keeping only the named channels, renumbered "
                                               "(a baseline on fewer modalities; inputs for a fewer-modality student)")
    p.add_argument("dataset", help="source dataset name or id in $nnUNet_raw")
    p.add_argument("--channels", required=True, help="channel names as in dataset.json, in the new order, e.g. "
                                                     "FLAIR,T1CE")
    p.add_argument("--dataset-id", type=int, required=True, help="id of the new dataset")
    p.add_argument("--name", default=None, help="name of the new dataset (default: <source name>_<channels>)")
    p.add_argument("--raw", default=None, help="raw data folder (default: $nnUNet_raw)")
    p.set_defaults(func=subset_channels_command)

    p = sub.add_parser("demo", help="teacher, student and KD student end to end on the generated dataset")
    p.add_argument("--workdir", default="nnunet_kd_demo", help="folder for raw, preprocessed and results data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--fresh", action="store_true", help="delete the work folder's earlier results first")
    p.set_defaults(func=demo_command)

    p = sub.add_parser("bench", help="benchmarks: training-step cost of KD, inference speed")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("step", help="time train steps of the plain student and each KD trainer, interleaved")
    p.add_argument("dataset", nargs="?", default="900", help="dataset (default: the demo's, 900)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans_KDStudent_w0.25", help="student plans")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_STEP_TRAINERS,
                   help="first one is the reference (plain student)")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: the stock or demo teacher)")
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

    p = sub.add_parser("report", help="Markdown table of every trained model of a dataset (validation Dice, size, "
                                      "speed, KD gap closed)")
    p.add_argument("dataset", nargs="?", default="900")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--time-cases", type=int, default=2, help="validation cases to time per model (0: skip)")
    p.add_argument("--workdir", default="nnunet_kd_demo", help="demo folder used when nnUNet_results is unset")
    p.add_argument("-o", "--output", default=None, help="also write the table to this file")
    p.set_defaults(func=report_command)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KDConfigurationError as e:
        print(f"nnunet_kd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
