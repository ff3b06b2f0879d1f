"""Commands of the KD study: run one (paired seeds), compare two, recompute a report from per-case Dice, and draw
Dice against student size over several."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError
from nnunet_kd.tools import dataset_name, default_teacher

DEFAULT_STUDY_TRAINERS = ["nnUNetTrainerStudent", "nnUNetTrainerKDLogits"]


def study_command(args: argparse.Namespace) -> None:
    from nnunetv2.paths import nnUNet_results

    from nnunet_kd.data.holdout import case_groups
    from nnunet_kd.tools.study import StudyPlan, record_group_pattern, run_study
    from nnunet_kd.tools.study_report import write_report

    if args.schedule and (args.epochs or args.iterations or args.val_iterations):
        raise KDConfigurationError("Give either --schedule or --epochs/--iterations/--val-iterations, not both.")
    dataset = dataset_name(args.dataset)
    teacher = args.teacher or default_teacher(args.dataset, args.configuration)
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
                     student_channels=args.student_channels, group_pattern=args.group_pattern)
    if plan.group_pattern and plan.test_labels and Path(plan.test_labels).is_dir():  # refused before any training
        case_groups(sorted(p.name for p in Path(plan.test_labels).iterdir()), plan.group_pattern)
    output = Path(args.output or f"study_{dataset}_{args.configuration}_{args.plans}")
    if args.report_only:
        record_group_pattern(output, plan.group_pattern)
    else:
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
        print(f"published: {tables.parent} (study.json, per_case_dice.csv, models.json, {tables.name})")
    else:
        print(study_tables(source), end="")


def study_curve_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.study_curve import CURVE_CSV, CURVE_FIGURE, study_curve

    lines = {}
    for item in args.line:
        name, sep, summary = item.partition("=")
        if not sep or not name or not Path(summary).is_file():
            raise KDConfigurationError(f"--line {item}: give NAME=SUMMARY_JSON, an existing nnU-Net summary.json "
                                       f"(e.g. \"5-fold ensemble=ensemble_predictions/summary.json\").")
        lines[name] = Path(summary)
    output = Path(args.output)
    report = study_curve([Path(s) for s in args.studies], output, args.split, args.class_name, lines,
                         args.group_pattern)
    print(f"written: {report}, {output / CURVE_CSV}, {output / CURVE_FIGURE}")


def study_lesions_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.study_lesions import CSV_FILE, write_lesion_report

    report = write_lesion_report(Path(args.study), args.label)
    print(report.read_text(), end="")
    print(f"written: {report} and {report.parent / CSV_FILE}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """study, study-compare and study-report."""
    p = sub.add_parser("study", help="does KD pay off? every trainer on the same seeds, paired with the no-KD "
                                     "baseline, stock nnUNetv2_train/predict, report with confidence intervals")
    p.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", required=True, help="the students' plans (nnunet_kd student-plans)")
    p.add_argument("--teacher", default=None, help="teacher model folder, absolute or under $nnUNet_results/<dataset> "
                                                   "(default: nnUNetTrainer__nnUNetPlans__<configuration>)")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_STUDY_TRAINERS,
                   help="trainers to compare; the first is the no-KD baseline; one trainer alone makes one side of "
                        "a `study-compare` with another study (default: %(default)s)")
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
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="cases that are one patient, averaged per patient before every interval: the regex's first "
                        "group, matched at the start of the case name, names the patient (e.g. '(patient\\d+)_' "
                        "for ACDC's two frames per patient, as given to nnunet_kd prepare)")
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

    p = sub.add_parser("study-curve", help="Dice against student size, plain and KD with their intervals, from one "
                                           "study per size; the teacher and other models as lines")
    p.add_argument("studies", nargs="+", help="study folders or published copies, one student size each")
    p.add_argument("-o", "--output", required=True, help="folder for curve.md, curve.csv and curve.png")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="the cases the curve is measured on (default: %(default)s)")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                   help="a second panel for this class (dataset.json's name, e.g. MYO for ACDC's myocardium)")
    p.add_argument("--line", action="append", default=[], metavar="NAME=SUMMARY_JSON",
                   help="another model as a horizontal line: the summary.json of its nnUNetv2_predict output, "
                        "scored on the same cases (repeatable)")
    p.add_argument("--group-pattern", default=None, metavar="REGEX",
                   help="average the cases of one patient first (the regex's first group names it, e.g. "
                        "'(patient\\d+)_' for ACDC's two frames per patient), so intervals count patients")
    p.set_defaults(func=study_curve_command)

    p = sub.add_parser("study-lesions", help="a study's test-set predictions scored as a lesion reader would: false-"
                                             "positive volume on lesion-free slices, HD95, missed lesions; KD against "
                                             "the baseline, paired by seed and case")
    p.add_argument("study", help="study folder (nnunet_kd study -o, run with --test-images and --test-labels)")
    p.add_argument("--label", type=int, default=1, help="the lesion's label value (default: %(default)s)")
    p.set_defaults(func=study_lesions_command)
