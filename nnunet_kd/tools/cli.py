"""`nnunet_kd` command line: every command group registers its own subcommands; the demo is here."""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from nnunet_kd.core.settings import KDConfigurationError


def demo_command(args: argparse.Namespace) -> None:
    from nnunet_kd.tools.demo import run_demo

    run_demo(Path(args.workdir), args.device, fresh=args.fresh)


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `nnunet_kd` parser and its subcommands (each with its handler as `func`)."""
    from nnunet_kd.spine import commands as spine_commands
    from nnunet_kd.tools import bench_commands, model_commands, prepare_commands, study_commands

    parser = argparse.ArgumentParser(prog="nnunet_kd", description=(
        "Knowledge distillation for nnU-Net v2: student plans, stored teacher targets, KD studies, benchmarks, ONNX "
        "export and CPU prediction, and the two-stage spine pipeline."))
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_commands.add_parsers(sub)
    p = sub.add_parser("demo", help="teacher, student and KD student end to end on the generated dataset")
    p.add_argument("--workdir", default="nnunet_kd_demo", help="folder for raw, preprocessed and results data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--fresh", action="store_true", help="delete the work folder's earlier results first")
    p.set_defaults(func=demo_command)
    bench_commands.add_parsers(sub)
    study_commands.add_parsers(sub)
    model_commands.add_parsers(sub)
    spine_commands.add_parsers(sub)
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


def console_main() -> None:
    """The `nnunet_kd` executable: `main`, then the interpreter's exit without its last garbage collection.

    That collection walks every object torch and nnU-Net created at import, about 0.6 s of a `predict-onnx` call that
    takes 7 s in all (BENCHMARKS.md, "A CT in seconds on a CPU"); frozen objects are skipped by it and the process
    ends as before: atexit handlers run, files and streams are flushed and closed. Not in `main`, which a Python
    program may call and go on.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    console_main()
