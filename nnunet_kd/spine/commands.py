"""`nnunet_kd spine ...`: generate, convert, predict and evaluate (see README, "Individual vertebrae")."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from nnunet_kd.core.settings import KDConfigurationError

DATASET_NAMES = ("SpineLocation", "SpineVertebrae", "SpineOneShot")


def _nnunet_folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise KDConfigurationError(f"{variable} is not set; export it as for any nnU-Net command.")
    return Path(value)


def generate_command(args: argparse.Namespace) -> None:
    from nnunet_kd.spine.synthetic import SpineSpec, write_spine_dataset

    names = write_spine_dataset(Path(args.output), args.cases, SpineSpec(seed=args.seed))
    print(f"wrote {len(names)} generated spine CTs with vertebra masks and centroids to {args.output}")


def convert_command(args: argparse.Namespace) -> None:
    from nnunet_kd.spine.derive import (
        write_grouped_splits,
        write_one_shot_dataset,
        write_stage1_dataset,
        write_stage2_dataset,
    )
    from nnunet_kd.spine.verse import find_cases

    raw, preprocessed = _nnunet_folder("nnUNet_raw"), _nnunet_folder("nnUNet_preprocessed")
    cases = find_cases(args.input)
    if len(cases) > 1 and not 2 <= args.folds <= len(cases):
        raise KDConfigurationError(f"--folds {args.folds} with {len(cases)} scans: every fold needs scans to train and "
                                   f"to validate on; use 2 to {len(cases)} folds (nnU-Net's default is 5).")
    names = [f"Dataset{args.id + i:03d}_{name}" for i, name in enumerate(DATASET_NAMES)]
    taken = [n for n in names if any(raw.glob(f"Dataset{n[7:10]}_*")) and not (raw / n).is_dir()]
    if taken:
        raise KDConfigurationError(f"Dataset ids of {taken} are used by other datasets in {raw}; choose another --id.")
    write_stage1_dataset(cases, raw / names[0], args.stage1_spacing)
    groups = write_stage2_dataset(cases, raw / names[1], args.stage2_spacing, args.patch_mm, args.jitter_mm,
                                  args.empty_memory, args.seed)
    # one scan cannot be split: its patches train with fold `all`
    splits = write_grouped_splits(preprocessed / names[1], groups, args.folds) if len(cases) > 1 else \
        "one scan, no folds: train with fold all"
    write_one_shot_dataset(cases, raw / names[2], args.stage2_spacing)
    patches = sum(len(v) for v in groups.values())
    print(f"{len(cases)} scans -> {raw / names[0]} (spine at {args.stage1_spacing} mm), {raw / names[1]} ({patches} "
          f"patches of {args.patch_mm} mm at {args.stage2_spacing} mm; folds by scan: {splits}), {raw / names[2]} "
          f"(the one-shot baseline)")
    print("next: nnUNetv2_plan_and_preprocess -d " + " ".join(str(args.id + i) for i in range(3)) +
          " -c 3d_fullres; nnUNetv2_train <id> 3d_fullres FOLD for each; then nnunet_kd spine predict")


def _input_cts(path: Path) -> list[Path]:
    """A CT file, or a folder's CTs: in a VerSe-style folder only the `*_ct.nii.gz` files, never the masks."""
    if not path.is_dir():
        return [path]
    from nnunet_kd.spine.verse import CT_SUFFIX

    return sorted(path.rglob(f"*{CT_SUFFIX}")) or sorted(path.glob("*.nii.gz"))


def predict_command(args: argparse.Namespace) -> None:
    import SimpleITK as sitk

    from nnunet_kd.spine.pipeline import NnUNetStages, segment_vertebrae

    inputs = _input_cts(Path(args.input))
    if not inputs:
        raise KDConfigurationError(f"No .nii.gz CT in {args.input}.")
    stages = NnUNetStages(args.stage1, args.stage2, args.folds1, args.folds2, args.device,
                          mirroring=not args.disable_tta)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        name = path.name.removesuffix(".nii.gz").removesuffix("_ct").removesuffix("_0000")
        print(f"{name}:", flush=True)
        result = segment_vertebrae(sitk.ReadImage(str(path)), stages.locate, stages.segment, stages.settings,
                                   progress=lambda message: print(f"  {message}", flush=True))
        sitk.WriteImage(result.instances, str(output / f"{name}.nii.gz"))
        (output / f"{name}_centroids.json").write_text(json.dumps(result.centroids, indent=1))


COUNTS = ("missed", "split", "merged", "spurious")  # per-vertebra failure counts, summed over scans


def score_folder(predictions: str | Path, reference: str | Path) -> tuple[list[dict], dict]:
    """Per-case scores of a folder of `<case>.nii.gz` label maps against a VerSe-style folder, and their summary."""
    import SimpleITK as sitk

    from nnunet_kd.spine.evaluate import score_vertebrae
    from nnunet_kd.spine.verse import find_cases, read_case

    rows = []
    for case in find_cases(reference):
        prediction_path = Path(predictions) / f"{case.name}.nii.gz"
        if not prediction_path.is_file():
            raise KDConfigurationError(f"No prediction {prediction_path} for reference case {case.name}.")
        _, mask = read_case(case)
        prediction = sitk.Resample(sitk.ReadImage(str(prediction_path)), mask, sitk.Transform(),
                                   sitk.sitkNearestNeighbor, 0)
        scores = score_vertebrae(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(prediction),
                                 tuple(reversed(mask.GetSpacing())))
        rows.append({"case": case.name, **scores})
    detected_hd95 = [v["hd95_mm"] for r in rows for v in r["vertebrae"] if v["detected"]]
    summary = {"scans": len(rows), "mean_dice": float(np.mean([r["mean_dice"] for r in rows])),
               "mean_hd95_mm_detected": float(np.mean(detected_hd95)) if detected_hd95 else float("nan"),
               "reference_count": int(sum(r["reference_count"] for r in rows)),
               "detected": int(sum(r["detected"] for r in rows)),
               **{k: int(sum(r[k] for r in rows)) for k in COUNTS}}
    summary["detection_rate"] = summary["detected"] / max(1, summary["reference_count"])
    return rows, summary


def evaluate_command(args: argparse.Namespace) -> None:
    rows, summary = score_folder(args.predictions, args.reference)
    keys = ("reference_count", "detected", *COUNTS)
    print(f"{'case':<24}{'Dice':>7}{'HD95 mm':>9}" + "".join(f"{k:>16}" for k in keys))
    for row in rows:
        print(f"{row['case']:<24}{row['mean_dice']:>7.3f}{row['mean_hd95_mm_detected']:>9.2f}"
              + "".join(f"{row[k]:>16}" for k in keys))
    print(f"all: mean Dice {summary['mean_dice']:.3f}, detection rate {summary['detection_rate']:.3f}, " +
          ", ".join(f"{k} {summary[k]}" for k in COUNTS))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise KDConfigurationError(f"{what} {text!r}: write NAME=VALUE, e.g. 'KD student=predictions/kd'.")
    return name, value


def table_command(args: argparse.Namespace) -> None:
    seconds = dict(_name_value(text, "--seconds") for text in args.seconds)
    runs = [_name_value(text, "run") for text in args.runs]
    unknown = sorted(set(seconds) - {name for name, _ in runs})
    if unknown:
        raise KDConfigurationError(f"--seconds names {unknown}, which are not among the runs {[n for n, _ in runs]}.")
    lines = ["| model | scans | mean Dice | HD95 mm (detected) | detected | missed | split | merged | spurious |"
             + (" s / scan |" if seconds else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if seconds else "")]
    summaries = {}
    for name, folder in runs:
        _, summary = score_folder(folder, args.reference)
        summaries[name] = summary
        line = (f"| {name} | {summary['scans']} | {summary['mean_dice']:.3f} | "
                f"{summary['mean_hd95_mm_detected']:.1f} | "
                f"{summary['detected']} / {summary['reference_count']} ({summary['detection_rate']:.0%}) | "
                + " | ".join(str(summary[k]) for k in COUNTS) + " |")
        if seconds:
            line += f" {float(seconds[name]) / summary['scans']:.1f} |" if name in seconds else " - |"
        lines.append(line)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "seconds": seconds}, indent=1))


def add_parsers(sub) -> None:
    spine = sub.add_parser("spine", help="individual vertebrae: the two-stage pipeline of Serrador et al. 2024 on "
                                         "ordinary nnU-Net models").add_subparsers(dest="spine_command", required=True)
    p = spine.add_parser("generate", help="write generated spine CTs in the VerSe layout (tests, demo)")
    p.add_argument("output")
    p.add_argument("-n", "--cases", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=generate_command)

    p = spine.add_parser("convert", help="VerSe-style scans -> the stage-1, stage-2 and one-shot nnU-Net datasets")
    p.add_argument("input", help="folder with *_ct.nii.gz and *_seg-vert_msk.nii.gz (any VerSe layout)")
    p.add_argument("--id", type=int, required=True, help="first dataset id; id, id+1, id+2 are written")
    p.add_argument("--stage1-spacing", type=float, default=4.0, help="mm (default: %(default)s)")
    p.add_argument("--stage2-spacing", type=float, default=1.0, help="mm (default: %(default)s)")
    p.add_argument("--patch-mm", type=float, default=96.0, help="stage-2 patch edge (default: %(default)s)")
    p.add_argument("--jitter-mm", type=float, default=8.0, help="random shift of patch centres (default: %(default)s)")
    p.add_argument("--empty-memory", type=float, default=0.25,
                   help="share of vertebrae that also get a patch with an empty memory (default: %(default)s)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=convert_command)

    p = spine.add_parser("predict", help="CTs -> vertebrae numbered from the top (label map + centroids JSON)")
    p.add_argument("-i", "--input", required=True, help="a CT file or a folder of .nii.gz CTs")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--stage1", required=True, help="trained stage-1 model folder")
    p.add_argument("--stage2", required=True, help="trained stage-2 model folder (e.g. a KD student)")
    p.add_argument("-f1", "--folds1", nargs="+", type=int, default=[0])
    p.add_argument("-f2", "--folds2", nargs="+", type=int, default=[0])
    p.add_argument("-device", "--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--disable_tta", action="store_true")
    p.set_defaults(func=predict_command)

    p = spine.add_parser("evaluate", help="per-vertebra Dice, HD95, detected / missed / split / merged")
    p.add_argument("predictions", help="folder of <case>.nii.gz label maps (spine predict, or a baseline's)")
    p.add_argument("reference", help="the VerSe-style folder with the reference masks")
    p.add_argument("--json", default=None)
    p.set_defaults(func=evaluate_command)

    p = spine.add_parser("table", help="several prediction folders scored against one reference, as a Markdown table")
    p.add_argument("reference", help="the VerSe-style folder with the reference masks")
    p.add_argument("runs", nargs="+", metavar="NAME=FOLDER", help="e.g. teacher=pred/teacher 'KD student=pred/kd'")
    p.add_argument("--seconds", nargs="*", default=[], metavar="NAME=SECONDS",
                   help="wall seconds each run's prediction took over all scans (a column s / scan)")
    p.add_argument("--json", default=None)
    p.set_defaults(func=table_command)
