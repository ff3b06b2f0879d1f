"""`nnunet_kd` command line: student plans, the generated datasets, channel subsets, and the end-to-end demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError, ensure_ext_trainer


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name for a name or id, or one clear line saying where it was looked for."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        folders = ", ".join(f"{v}={os.environ.get(v) or '(unset)'}"
                            for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        raise KDConfigurationError(f"Dataset {dataset} not found in nnU-Net's folders ({folders}). Check the id, or "
                                   f"export the folders that hold it.") from e


def _dataset_folder(dataset: str) -> Path:
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed.is_set():
        raise KDConfigurationError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    folder = Path(nnUNet_preprocessed.get()) / dataset_name(dataset)
    if not folder.is_dir():
        raise KDConfigurationError(f"{folder} does not exist. Run `nnUNetv2_plan_and_preprocess -d {dataset}` first.")
    return folder


def _read_plans(dataset: str, plans_name: str) -> tuple[Path, dict]:
    """The preprocessed dataset folder and the plans `plans_name` in it."""
    folder = _dataset_folder(dataset)
    plans_file = folder / f"{plans_name}.json"
    if not plans_file.is_file():
        raise KDConfigurationError(f"{plans_file} not found. Plan the dataset with these plans first, or pass -p with "
                                   f"one of {sorted(p.stem for p in folder.glob('*Plans*.json'))}.")
    return folder, json.loads(plans_file.read_text())


def student_plans_command(args: argparse.Namespace) -> None:
    from nnunet_kd.students.plans import count_parameters, make_student_plans, write_plans

    folder, teacher_plans = _read_plans(args.dataset, args.plans)
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

    folder, plans = _read_plans(args.dataset, args.plans)
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


def holdout_command(args: argparse.Namespace) -> None:
    from nnunet_kd.data.holdout import write_holdout_dataset

    raw = Path(_raw_folder(args.raw))
    source = dataset_name(args.dataset)
    name = args.name or f"{source.split('_', 1)[1]}Holdout{args.test_cases}"
    destination = raw / f"Dataset{args.dataset_id:03d}_{name}"
    split = write_holdout_dataset(raw / source, destination, args.test_cases, args.seed)
    print(f"wrote {destination}: {len(split['training'])} training cases (imagesTr), {len(split['test'])} held-out "
          f"test cases (imagesTs, labelsTs)")
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id}; test with nnunet_kd study ... "
          f"--test-images {destination / 'imagesTs'} --test-labels {destination / 'labelsTs'}")


def check_channels_command(args: argparse.Namespace) -> None:
    from nnunet_kd.students.modalities import select_channels, subset_preprocessing_difference

    dataset = dataset_name(args.dataset)
    raw = Path(_raw_folder(None)) / dataset
    folder = _dataset_folder(dataset)
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


DEFAULT_STEP_TRAINERS = ["nnUNetTrainerStudent", "nnUNetTrainerKDLogits", "nnUNetTrainerKDLogitMatching",
                         "nnUNetTrainerKDClassAffinity", "nnUNetTrainerKDMultiScale"]


def _use_demo_workspace_if_unset(workdir: str) -> None:
    """Benchmarks default to the demo's dataset: point nnU-Net at the demo's folders unless the user set them."""
    from nnunet_kd.tools.demo import workspace_environment

    if not os.environ.get("nnUNet_results") and Path(workdir).is_dir():
        os.environ.update(workspace_environment(Path(workdir).resolve()))


def _default_teacher(dataset: str, configuration: str) -> str:
    from nnunetv2.paths import nnUNet_results

    if not nnUNet_results.is_set():
        raise KDConfigurationError("nnUNet_results is not set; export it or run `nnunet_kd demo` first.")
    folder = Path(nnUNet_results.get()) / dataset_name(dataset)
    for trainer in ("nnUNetTrainer", "nnUNetTrainer_demo"):
        candidate = folder / f"{trainer}__nnUNetPlans__{configuration}"
        if candidate.is_dir():
            return str(candidate)
    raise KDConfigurationError(f"No teacher in {folder}; pass --teacher MODEL_FOLDER.")


def bench_step_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.bench import bench_step, format_step

    _use_demo_workspace_if_unset(args.workdir)
    ensure_ext_trainer()
    teacher = args.teacher or _default_teacher(args.dataset, args.configuration)
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
    from nnunet_kd.tools.bench_predict import bench_predict, format_predict

    variants = [v.strip() for v in args.variants.split(";")]
    variants = ["" if v == "defaults" else v for v in variants if v]
    result = bench_predict(args.models, args.images, variants, args.labels, args.repeats, args.folds,
                           stages=not args.no_stages)
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

    from nnunet_kd.tools.bench import report

    _use_demo_workspace_if_unset(args.workdir)
    if not nnUNet_results.is_set():
        raise KDConfigurationError(f"nnUNet_results is not set and there is no demo workspace at "
                                   f"{Path(args.workdir).resolve()} (--workdir is relative to the current folder). "
                                   f"Export nnU-Net's folders, or pass --workdir with the demo's folder.")
    dataset = dataset_name(args.dataset)
    table = f"## {dataset}\n\n" + report(Path(nnUNet_results.get()) / dataset, args.device, args.time_cases)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


DEFAULT_STUDY_TRAINERS = ["nnUNetTrainerStudent", "nnUNetTrainerKDLogits"]


def study_command(args: argparse.Namespace) -> None:
    from nnunetv2.paths import nnUNet_results

    from nnunet_kd.tools.study import StudyPlan, run_study
    from nnunet_kd.tools.study_report import write_report

    if args.schedule and (args.epochs or args.iterations or args.val_iterations):
        raise KDConfigurationError("Give either --schedule or --epochs/--iterations/--val-iterations, not both.")
    dataset = dataset_name(args.dataset)
    teacher = args.teacher or _default_teacher(args.dataset, args.configuration)
    if not os.path.isabs(teacher):
        if not nnUNet_results.is_set():
            raise KDConfigurationError("nnUNet_results is not set; export it or give --teacher as an absolute path.")
        teacher = os.path.join(nnUNet_results.get(), dataset, teacher)
    plan = StudyPlan(dataset=dataset, configuration=args.configuration, plans=args.plans,
                     teacher=os.path.abspath(teacher), trainers=tuple(args.trainers), seeds=tuple(args.seeds),
                     fold=args.fold, num_epochs=args.epochs, iterations_per_epoch=args.iterations,
                     val_iterations_per_epoch=args.val_iterations,
                     schedule=args.schedule,
                     test_images=os.path.abspath(args.test_images) if args.test_images else None,
                     test_labels=os.path.abspath(args.test_labels) if args.test_labels else None,
                     device=args.device, teacher_targets=args.teacher_targets,
                     student_channels=args.student_channels)
    output = Path(args.output or f"study_{dataset}_{args.configuration}_{args.plans}")
    if not args.report_only:
        run_study(plan, output, jobs=args.jobs,
                  baseline_from=Path(args.baseline_from) if args.baseline_from else None)
    write_report(plan, output.resolve(), time_cases=args.time_cases)
    print(f"report: {output.resolve() / 'report.md'}")


def study_compare_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.study_report import compare_studies

    table = compare_studies(Path(args.reference), Path(args.other), args.trainers)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


def study_report_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.study_report import publish, study_tables

    source = Path(args.source)
    if args.publish:
        tables = publish(source, Path(args.publish))
        print(tables.read_text(), end="")
        print(f"published: {tables.parent} (study.json, per_case_dice.csv, {tables.name})")
    else:
        print(study_tables(source), end="")


def schedules_command(args: argparse.Namespace) -> None:
    from nnunet_kd.core.schedule import SCHEDULES

    print("Every trainer in trainers/ (and the stock nnUNetTrainer) has a variant <trainer>_<schedule>, made in "
          "trainers/nnUNetTrainer_schedules.py from this table (nnunet_kd/core/schedule.py); nnU-Net ships "
          "nnUNetTrainer_<N>epochs itself:")
    for name, attributes in SCHEDULES.items():
        print(f"  _{name:<10} " + ", ".join(f"{k}={v}" for k, v in attributes.items()))
    print("Any other length: nnUNet_KD_num_epochs, nnUNet_KD_iterations_per_epoch, nnUNet_KD_val_iterations_per_epoch "
          "(this package's trainers).")


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
    output = targets_root(_dataset_folder(args.dataset)) / (
        args.name or default_targets_name(spec, mirroring, args.format, args.top_k))
    part = f", part {args.part_id + 1} of {args.num_parts}" if args.num_parts > 1 else ""
    print(f"teacher {spec.model_folder}, folds {list(spec.folds)}, mirroring {mirroring}, format {args.format}"
          f"{part} -> {output}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = write_teacher_targets(spec, _dataset_folder(args.dataset), args.plans, args.configuration, output,
                                     mirroring, args.step_size, device, args.force, target_format=args.format,
                                     top_k=args.top_k, num_parts=args.num_parts, part_id=args.part_id,
                                     tile_batch=args.tile_batch)
    summary = summarise(manifest)
    stored_as = "float16" if args.format == "dense" else f"top-{args.top_k} float16"
    print(f"{summary['cases']} cases{part and ' in this part'}, {summary['total_mib']:.1f} MiB on disk "
          f"({summary['mean_case_mib']:.2f} MiB per case; float32 uncompressed: {summary['float32_mib']:.1f} MiB). "
          f"{stored_as} against float32: largest error {summary['max_abs_error']:.2g} in {manifest['stored']}, "
          f"{summary['max_abs_probability_error']:.2g} in probabilities (mean "
          f"{summary['mean_abs_probability_error']:.2g}).")
    print(f"train from them{' once every part has run' if part else ''}: nnUNet_KD_teacher_targets={output.name} "
          f"nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr nnUNetTrainerKDLogits -p STUDENT_PLANS")


def demo_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.demo import run_demo

    run_demo(Path(args.workdir), args.device, fresh=args.fresh)


def add_tile_batch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tile-batch", type=int, default=None,
                        help="sliding-window tiles per network call (default: as many as hold ~200,000 voxels, at "
                             "most 32; 1: nnU-Net's own tile-by-tile loop)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `nnunet_kd` parser and its subcommands (each with its handler as `func`)."""
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
                                             "relative to the first")
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

    p = sub.add_parser("study", help="does KD pay off? every trainer on the same seeds, paired with the no-KD "
                                     "baseline, stock nnUNetv2_train/predict, report with confidence intervals")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", required=True, help="the students' plans (nnunet_kd student-plans)")
    p.add_argument("--teacher", default=None, help="teacher model folder, absolute or under $nnUNet_results/<dataset> "
                                                   "(default: nnUNetTrainer__nnUNetPlans__<configuration>)")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_STUDY_TRAINERS,
                   help="trainers to compare; the first is the no-KD baseline (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the trainers' own)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default: the trainers' own)")
    p.add_argument("--val-iterations", type=int, default=None,
                   help="validation iterations per epoch, for nnU-Net's pseudo Dice curve (default: the trainers' own)")
    p.add_argument("--schedule", default=None, help="a named schedule instead: trains <trainer>_<schedule>, e.g. demo")
    p.add_argument("--test-images", default=None, help="test images in nnU-Net naming (optional)")
    p.add_argument("--test-labels", default=None, help="their reference segmentations")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="training and prediction device")
    p.add_argument("--teacher-targets", default=None,
                   help="stored teacher targets (`nnunet_kd teacher-targets`, a name or folder) the KD trainers learn "
                        "from instead of running the teacher (sets nnUNet_KD_teacher_targets)")
    p.add_argument("--student-channels", default=None, metavar="A,B",
                   help="students see only these channels (dataset.json names, in their input order), the teacher all "
                        "of them (sets nnUNet_KD_student_channels); the test set is predicted from the students' own "
                        "files, made once in STUDY/test_inputs")
    p.add_argument("--time-cases", type=int, default=3, help="validation cases to time per model on the CPU (0: skip)")
    p.add_argument("-o", "--output", default=None,
                   help="study folder (default: study_<dataset>_<configuration>_<plans>); re-running continues it")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (e.g. several small students on one "
                                                       "GPU; default: 1)")
    p.add_argument("--baseline-from", default=None, metavar="STUDY",
                   help="reuse the finished baseline runs of another study of the same dataset, plans, fold and "
                        "schedule (e.g. the online-KD study, when this one changes only the teacher targets)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    p.set_defaults(func=study_command)

    p = sub.add_parser("study-compare", help="the same trainers in two studies that differ in one setting (e.g. "
                                             "online vs stored-target KD), paired by seed and case")
    p.add_argument("reference", help="study folder (or a published copy), e.g. with the online teacher")
    p.add_argument("other", help="study folder of the same dataset, plans, fold and schedule, e.g. with stored targets")
    p.add_argument("--trainers", nargs="+", default=None, help="default: every KD trainer of OTHER that REFERENCE has")
    p.add_argument("-o", "--output", default=None, help="also write the Markdown table here")
    p.set_defaults(func=study_compare_command)

    p = sub.add_parser("study-report", help="a study's Dice and KD-against-baseline tables, recomputed from its "
                                            "per-case Dice (a study folder, or a published copy of one)")
    p.add_argument("source", help="study folder (nnunet_kd study -o), or a folder with study.json and "
                                  "per_case_dice.csv (e.g. benchmarks/results/<study>)")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="copy the study's plan and per-case Dice (a few kB) to DIR with the recomputed tables, so that "
                        "a published table can be recomputed without the runs")
    p.set_defaults(func=study_report_command)

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

    from nnunet_kd.spine.commands import add_parsers as add_spine_parsers

    add_spine_parsers(sub)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KDConfigurationError as e:
        print(f"nnunet_kd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
