"""Commands that prepare a dataset and its plans: the whole preparation in one step (`prepare`), student plans, a CPU
batch, generated datasets, channel subsets, a held-out test set, the channel-subset check, and the named schedules."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.tools import command_environment, dataset_folder, dataset_name, read_plans


def _raw_dataset(source: str, raw: Path, dataset_id: int | None) -> tuple[int, str]:
    """The dataset in nnU-Net's raw folder that `source` names, converted or linked there first where it is not yet: a
    folder in the Medical Segmentation Decathlon's layout (converted by nnU-Net) or in nnU-Net's raw layout (linked),
    or the name or id of a dataset already in $nnUNet_raw. Returns (id, DatasetXXX_Name)."""
    path = Path(source)
    if not path.is_dir():
        if path.exists():
            raise KDConfigurationError(f"{path} is a file: name a dataset folder, or a dataset in $nnUNet_raw.")
        name = dataset_name(source)
        return int(name[len("Dataset"):len("Dataset") + 3]), name
    if not (path / "dataset.json").is_file():
        raise KDConfigurationError(f"{path} has no dataset.json: give an MSD task folder or an nnU-Net raw dataset "
                                   f"folder.")
    dataset_json = json.loads((path / "dataset.json").read_text())
    named = re.fullmatch(r"(?:Task(\d+)|Dataset(\d{3}))_(.+)", path.name)
    if dataset_id is None and not named:
        raise KDConfigurationError(f"{path.name} carries no dataset id (TaskXX_Name, DatasetXXX_Name): pass "
                                   f"--dataset-id.")
    number = dataset_id if dataset_id is not None else int(named.group(1) or named.group(2))
    name = f"Dataset{number:03d}_{named.group(3) if named else path.name}"
    target = raw / name
    if (target / "dataset.json").is_file():
        return number, name
    taken = sorted(p.name for p in raw.glob(f"Dataset{number:03d}_*"))
    if taken:
        raise KDConfigurationError(f"Dataset id {number} is taken in {raw} ({taken[0]}): pass --dataset-id with a "
                                   f"free id.")
    if "channel_names" not in dataset_json and "modality" in dataset_json:  # the Decathlon's dataset.json
        _run(["nnUNetv2_convert_MSD_dataset", "-i", str(path.resolve()), "-overwrite_id", str(number)])
        converted = sorted(raw.glob(f"Dataset{number:03d}_*"))
        if converted and converted[0].name != name:  # nnU-Net names it after the task
            converted[0].rename(target)
    else:  # nnU-Net reads it where it is: no second copy of the images
        target.symlink_to(path.resolve(), target_is_directory=True)
    return number, name


def _run(command: list[str], log: Path | None = None) -> None:
    """An nnU-Net command as a subprocess, its output to `log` (else to the terminal); a failure names the log."""
    print("$ " + " ".join(command), flush=True)
    if log is None:
        proc = subprocess.run(command, env=command_environment())
    else:
        with open(log, "w") as out:
            proc = subprocess.run(command, env=command_environment(), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise KDConfigurationError(f"`{' '.join(command)}` exited {proc.returncode}" + (f"; see {log}" if log else ""))


def prepare_command(args: argparse.Namespace) -> None:
    from nnunet_kd.data.holdout import labelled_cases, write_grouped_splits, write_holdout_dataset
    from nnunet_kd.students.plans import make_student_plans, with_batch_size, write_plans

    raw = Path(_raw_folder(None))
    if not os.environ.get("nnUNet_preprocessed"):
        raise KDConfigurationError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    raw.mkdir(parents=True, exist_ok=True)
    number, name = _raw_dataset(args.source, raw, args.dataset_id)
    if args.holdout:
        if args.holdout_id is None:
            raise KDConfigurationError("--holdout needs --holdout-id, the id of the dataset without the test cases.")
        source_name, number = name, args.holdout_id
        name = f"Dataset{number:03d}_{_holdout_name(source_name, args.holdout)}"
        if not (raw / name / "dataset.json").is_file():
            split = write_holdout_dataset(raw / source_name, raw / name, args.holdout, args.holdout_seed,
                                          args.group_pattern)
            print(f"held out {len(split['test'])} labelled cases of {source_name}: {raw / name}/imagesTs, labelsTs")
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / name
    missing = [c for c in args.configurations if not (preprocessed / f"nnUNetPlans_{c}").is_dir()]
    if missing:
        preprocessed.mkdir(parents=True, exist_ok=True)
        log = preprocessed / "plan_and_preprocess.log"
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(number), "-c", *missing, "--verify_dataset_integrity",
              "-npfp", str(args.processes), "-np", str(args.processes)], log)
    if args.group_pattern:
        splits = write_grouped_splits(preprocessed, labelled_cases(raw / name), args.group_pattern)
        print(f"folds by group ({args.group_pattern}): {splits}")
    folder, plans = read_plans(str(number), "nnUNetPlans")
    if args.batch_size:
        plans = with_batch_size(plans, args.configurations, args.batch_size)
        write_plans(plans, folder)
    made = [plans["plans_name"]]
    for width in args.widths or ():
        student = make_student_plans(plans, args.configurations, width)
        write_plans(student, folder)
        made.append(student["plans_name"])
    print(f"{name} (id {number}) is planned and preprocessed for {', '.join(args.configurations)}.")
    print(f"teacher plans: {made[0]}" + (f"; student plans: {', '.join(made[1:])}" if made[1:] else ""))
    configuration = args.configurations[0]
    print(f"train the teacher: nnUNetv2_train {number} {configuration} FOLD -p {made[0]}")
    if made[1:]:
        print(f"then a student: nnUNet_KD_teacher=nnUNetTrainer__{made[0]}__{configuration} nnUNetv2_train {number} "
              f"{configuration} FOLD -tr nnUNetTrainerKDLogits -p {made[1]}")


def student_plans_command(args: argparse.Namespace) -> None:
    from nnunet_kd.students.plans import count_parameters, make_student_plans, write_plans

    folder, teacher_plans = read_plans(args.dataset, args.plans)
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


def batch_plans_command(args: argparse.Namespace) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.students.plans import with_batch_size, write_plans

    folder, plans = read_plans(args.dataset, args.plans)
    variant = with_batch_size(plans, args.configurations, args.batch_size, args.name)
    path, written = write_plans(variant, folder, args.force)
    print(f"{'wrote' if written else 'unchanged (identical file exists)'}: {path}")
    for configuration in args.configurations:
        print(f"  {configuration}: batch {PlansManager(plans).get_configuration(configuration).batch_size} -> "
              f"{args.batch_size}")
    print(f"train with: nnUNetv2_train {args.dataset} {args.configurations[0]} FOLD -p {variant['plans_name']}")


def _raw_folder(raw: str | None) -> str:
    raw = raw or os.environ.get("nnUNet_raw")
    if not raw:
        raise KDConfigurationError("Give --raw or export nnUNet_raw.")
    return raw


def generate_dataset_command(args: argparse.Namespace) -> None:
    from nnunet_kd.data.synthetic import SyntheticSpec, write_dataset
    from nnunet_kd.data.synthetic_many_classes import write_many_class_dataset
    from nnunet_kd.data.synthetic_multimodal import write_multimodal_dataset

    raw = _raw_folder(args.raw)
    spec = SyntheticSpec(num_training=args.num_training, num_test=args.num_test, seed=args.seed,
                         **({"shape": tuple(args.shape)} if args.shape else {}))
    if args.multimodal and args.num_classes:
        raise KDConfigurationError("--multimodal and --num-classes are two different datasets: pass one of them")
    if args.num_classes:
        print(f"wrote {write_many_class_dataset(raw, args.dataset_id or 920, args.num_classes, spec=spec)}")
    elif args.multimodal:
        print(f"wrote {write_multimodal_dataset(raw, args.dataset_id or 910, spec=spec)}")
    else:
        print(f"wrote {write_dataset(raw, args.dataset_id or 900, spec=spec)}")


def subset_channels_command(args: argparse.Namespace) -> None:
    from nnunet_kd.students.modalities import subset_raw_dataset

    raw = Path(_raw_folder(args.raw))
    source = dataset_name(args.dataset)
    name = args.name or f"{source.split('_', 1)[1]}_{''.join(c.strip() for c in args.channels.split(','))}"
    print(f"wrote {subset_raw_dataset(raw / source, raw / f'Dataset{args.dataset_id:03d}_{name}', args.channels)}")


def _holdout_name(source: str, num_test_cases: int) -> str:
    """Dataset004_Hippocampus, 40 -> HippocampusHoldout40: the held-out dataset's name, without its id."""
    return f"{source.split('_', 1)[1]}Holdout{num_test_cases}"


def holdout_command(args: argparse.Namespace) -> None:
    from nnunet_kd.data.holdout import write_holdout_dataset

    raw = Path(_raw_folder(args.raw))
    source = dataset_name(args.dataset)
    name = args.name or _holdout_name(source, args.test_cases)
    destination = raw / f"Dataset{args.dataset_id:03d}_{name}"
    split = write_holdout_dataset(raw / source, destination, args.test_cases, args.seed, args.group_pattern)
    print(f"wrote {destination}: {len(split['training'])} training cases (imagesTr), {len(split['test'])} held-out "
          f"test cases (imagesTs, labelsTs)")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id}; test with nnunet_kd study ... "
          f"--test-images {destination / 'imagesTs'} --test-labels {destination / 'labelsTs'}")


def check_channels_command(args: argparse.Namespace) -> None:
    from nnunet_kd.students.modalities import select_channels, subset_preprocessing_difference

    dataset = dataset_name(args.dataset)
    raw = Path(_raw_folder(None)) / dataset
    folder = dataset_folder(dataset)
    plans_file = folder / f"{args.plans}.json"
    if not plans_file.is_file():
        raise KDConfigurationError(f"{plans_file} not found; plan the dataset first.")
    plans = json.loads(plans_file.read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    selection = select_channels(dataset_json, args.channels, "--channels")
    ending = dataset_json["file_ending"]
    cases = sorted({p.name[:-len(ending) - 5] for p in (raw / "imagesTr").glob(f"*_0000{ending}")})[:args.cases]
    differing = 0
    for case in cases:
        files = [str(raw / "imagesTr" / f"{case}_{i:04d}{ending}") for i in range(len(selection.all_names))]
        result = subset_preprocessing_difference(files, plans, args.configuration, dataset_json, selection)
        differing += not (result["same_crop"] and result["max_abs_difference"] == 0)
        print(f"{case}: crop {'same' if result['same_crop'] else 'DIFFERS'} {result['crop_subset']} (all channels "
              f"{result['crop_full']}), max |difference| of the normalised {args.channels} "
              f"{result['max_abs_difference']}")
    print(f"{differing} of {len(cases)} cases preprocess differently from {args.channels} alone than from all "
          f"channels{'' if differing else ': training and prediction see the same voxels'}.")


def schedules_command(args: argparse.Namespace) -> None:
    from nnunet_kd.core.schedule import SCHEDULES

    print("Every trainer in trainers/ (and the stock nnUNetTrainer) has a variant <trainer>_<schedule>, made in "
          "trainers/nnUNetTrainer_schedules.py from this table (nnunet_kd/core/schedule.py); nnU-Net ships "
          "nnUNetTrainer_<N>epochs itself:")
    for name, attributes in SCHEDULES.items():
        print(f"  _{name:<10} " + ", ".join(f"{k}={v}" for k, v in attributes.items()))
    print("Any other length: nnUNet_KD_num_epochs, nnUNet_KD_iterations_per_epoch, nnUNet_KD_val_iterations_per_epoch "
          "(this package's trainers).")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The dataset and plans commands."""
    p = sub.add_parser("prepare", help="a dataset ready for teacher and students in one step: an MSD task or nnU-Net "
                                       "raw folder converted or linked into $nnUNet_raw, an optional held-out test "
                                       "set, nnU-Net's planning and preprocessing, a CPU batch, student plans")
    p.add_argument("source", help="an MSD task folder (TaskXX_Name), an nnU-Net raw dataset folder (DatasetXXX_Name), "
                                  "or the name or id of a dataset in $nnUNet_raw")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="configurations to plan and preprocess (default: 3d_fullres)")
    p.add_argument("--dataset-id", type=int, default=None, help="id in $nnUNet_raw (default: the folder's own number)")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="hold out N labelled cases as a test set outside every fold (a new dataset, --holdout-id)")
    p.add_argument("--holdout-id", type=int, default=None, help="id of the dataset without the held-out cases")
    p.add_argument("--holdout-seed", type=int, default=0)
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="cases of one patient stay together, in the held-out set and in every fold (nnU-Net's "
                        "splits_final.json): a regular expression whose first group names the patient, matched at "
                        "the start of the case name (ACDC: '(patient\\d+)_')")
    p.add_argument("--batch-size", type=int, default=None,
                   help="a plans variant with this batch (e.g. 32 for 2d on a CPU); the students derive from it")
    p.add_argument("--widths", type=float, nargs="+", default=None, metavar="W",
                   help="student plans at these widths (e.g. 0.25 0.125)")
    p.add_argument("-np", "--processes", type=int, default=2,
                   help="fingerprint and preprocessing processes (default: 2; nnU-Net's default: 8 for the "
                        "fingerprint)")
    p.set_defaults(func=prepare_command)

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

    p = sub.add_parser("batch-plans", help="a plans variant with another batch size (e.g. for a CPU), same "
                                           "preprocessed data")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                   help="configurations to change (default: 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier to start from (default: nnUNetPlans)")
    p.add_argument("--name", default=None, help="plans identifier (default: <plans>_bs<batch size>)")
    p.add_argument("--force", action="store_true", help="replace an existing, different plans file of that name")
    p.set_defaults(func=batch_plans_command)

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
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="N labelled structures per volume instead (default dataset id 920), e.g. 50 to measure what "
                        "grows with the number of classes, such as stored teacher targets")
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

    p = sub.add_parser("holdout", help="copy a raw dataset with N labelled cases moved to imagesTs/labelsTs: a test "
                                       "set outside every cross-validation fold (e.g. for the 5-fold ensemble)")
    p.add_argument("dataset", help="source dataset name or id in $nnUNet_raw")
    p.add_argument("--test-cases", type=int, required=True, help="labelled cases to hold out")
    p.add_argument("--dataset-id", type=int, required=True, help="id of the new dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="hold out whole groups (patients): a regular expression whose first group names the patient, "
                        "e.g. '(patient\\d+)_' (splits by patient: nnunet_kd prepare --group-pattern)")
    p.add_argument("--name", default=None, help="name of the new dataset (default: <source name>Holdout<N>)")
    p.add_argument("--raw", default=None, help="raw data folder (default: $nnUNet_raw)")
    p.set_defaults(func=holdout_command)

    p = sub.add_parser("check-channels", help="does nnU-Net preprocess a channel subset as it does with all channels? "
                                              "(crop and normalisation seen by a fewer-modality student)")
    p.add_argument("dataset", help="dataset name or id (raw and preprocessed)")
    p.add_argument("--channels", required=True, help="the student's channels by dataset.json name, e.g. FLAIR,T1CE")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--cases", type=int, default=5, help="training cases to check (default: 5)")
    p.set_defaults(func=check_channels_command)

    p = sub.add_parser("schedules", help="the named schedules: where nnUNetTrainerKDLogits_demo and the like come from")
    p.set_defaults(func=schedules_command)
