"""`nnunet_kd` command line: student plans, the generated dataset, and the end-to-end demo."""
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


def generate_dataset_command(args: argparse.Namespace) -> None:
    from nnunet_kd.synthetic import SyntheticSpec, write_dataset

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise KDConfigurationError("Give --raw or export nnUNet_raw.")
    spec = SyntheticSpec(num_training=args.num_training, num_test=args.num_test, seed=args.seed)
    print(f"wrote {write_dataset(raw, args.dataset_id, spec=spec)}")


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
    p.add_argument("--dataset-id", type=int, default=900)
    p.add_argument("--num-training", type=int, default=24)
    p.add_argument("--num-test", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=generate_dataset_command)

    p = sub.add_parser("demo", help="teacher, student and KD student end to end on the generated dataset")
    p.add_argument("--workdir", default="nnunet_kd_demo", help="folder for raw, preprocessed and results data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--fresh", action="store_true", help="delete the work folder's earlier results first")
    p.set_defaults(func=demo_command)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KDConfigurationError as e:
        print(f"nnunet_kd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
