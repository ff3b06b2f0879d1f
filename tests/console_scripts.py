"""Run this environment's console scripts (`nnUNetv2_train`, `nnunet_kd`, ...) for the tests without paying the
interpreter's imports on every call.

A command line spends about 5 s importing torch, nnU-Net, SciPy and matplotlib before it does anything, and the suite
runs some hundred of them on tiny data: on two cores most of its time was imports. Here each command runs in a new
process forked from a server (Python's forkserver) that imported those modules once. The process gets the command's
argv, environment and working directory and its own stdout / stderr at the file-descriptor level (what its own child
processes print included), and calls the entry point that the console script calls, so nnU-Net runs exactly its own
code; the exit status and output are what the executable gives.

What a fork cannot reproduce goes to a fresh executable instead: a name that is not a console script of this Python's
environment (or that PATH resolves elsewhere), and a command whose environment differs from the server's in a variable
read at import time. `NNUNET_KD_TEST_EXEC=1` runs every command as a fresh executable.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

PRELOADED = ("torch", "nnunetv2.run.run_training", "nnunetv2.inference.predict_from_raw_data",
             "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "nnunet_kd.tools.cli")
# read once, when the modules above (or the libraries under them) are imported: a command that sets them differently
# from the server needs a fresh interpreter
READ_AT_IMPORT = ("nnUNet_def_n_proc", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                  "PYTHONPATH", "PYTHONWARNINGS")

_server_environment: dict[str, str | None] | None = None


@cache
def _entry_points() -> dict[str, str]:
    return {entry.name: entry.value for entry in entry_points(group="console_scripts")}


def _import_time_values(env: Mapping[str, str]) -> dict[str, str | None]:
    return {name: env.get(name) for name in READ_AT_IMPORT}


def _forkable_script(name: str, env: Mapping[str, str]) -> Path | None:
    """The console script `name` resolves to, if a fork of the server runs it as that executable would."""
    if os.environ.get("NNUNET_KD_TEST_EXEC") or name not in _entry_points():
        return None
    script = shutil.which(name, path=env.get("PATH"))
    if script is None or Path(script).parent != Path(sys.executable).parent:
        return None
    if _server_environment is not None and _import_time_values(env) != _server_environment:
        return None
    return Path(script)


def _forkserver(env: Mapping[str, str]) -> multiprocessing.context.ForkServerContext:
    global _server_environment
    context = multiprocessing.get_context("forkserver")
    if _server_environment is None:
        from nnunet_kd.tools.bench import _environment  # torch: only where a command runs

        context.set_forkserver_preload(list(PRELOADED))
        # the server inherits this process's environment when it starts: the command's import-time values
        with _environment(**{k: v for k, v in _import_time_values(env).items() if v is not None}):
            multiprocessing.forkserver.ensure_running()
            _server_environment = _import_time_values(os.environ)
    return context


def _run_entry_point(entry: str, argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked process: become the command, then exit as its interpreter would."""
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, as in a fresh interpreter
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = argv
    try:
        sys.exit(EntryPoint(Path(argv[0]).name, entry, "console_scripts").load()())
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    finally:
        atexit._run_exitfuncs()


def run(args: Sequence[str], env: Mapping[str, str], cwd: Path | str,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)`, forked from the
    server where that gives the same result."""
    args = [str(arg) for arg in args]
    script = _forkable_script(args[0], env)
    if script is None:
        return subprocess.run(args, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="console_script_") as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        stdout.touch()
        stderr.touch()
        process = _forkserver(env).Process(
            name=args[0], target=_run_entry_point,
            args=(_entry_points()[args[0]], [str(script), *args[1:]], dict(env), str(cwd), str(stdout), str(stderr)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(args, timeout, stdout.read_text(errors="replace"),
                                            stderr.read_text(errors="replace"))
        return subprocess.CompletedProcess(args, process.exitcode, stdout.read_text(errors="replace"),
                                           stderr.read_text(errors="replace"))
