"""The tests' runner for console scripts (tests/console_scripts.py) gives what the executable gives."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import console_scripts
import pytest

pytestmark = pytest.mark.e2e  # runs nnU-Net's and this package's commands, twice each


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    # as the workspace's commands have it (conftest), so that one server in this test worker serves both
    env.update({"nnUNet_def_n_proc": "1", "nnUNet_raw": str(tmp_path / "raw"),
                "nnUNet_preprocessed": str(tmp_path / "preprocessed"), "nnUNet_results": str(tmp_path / "results"),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **extra})
    return env


def _significant(stderr: str) -> list[str]:
    """stderr without the warnings that modules print once, when they are imported (the server imported them
    before the fork), and without a traceback's outermost frame: the console script's own `<module>` line, or the
    runner's call of the same entry point."""
    lines, kept = stderr.splitlines(), []
    skipping = False
    for i, line in enumerate(lines):
        if "Warning: " in line or (i > 0 and "Warning: " in lines[i - 1]):
            continue
        if line.startswith("  File "):
            skipping = "console_scripts.py" in line or f"{Path(sys.executable).parent}{os.sep}" in line
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return kept


@pytest.mark.parametrize("args", [
    ("nnunet_kd", "student-plans", "987", "--width", "0.25"),  # a refusal: no such dataset
    ("nnUNetv2_train", "987", "3d_fullres", "0", "-device", "cpu"),  # nnU-Net's own error, with its traceback
    ("nnunet_kd", "holdout", "--help"),
])
def test_a_forked_command_gives_what_the_executable_gives(tmp_path, monkeypatch, args):
    (tmp_path / "cwd").mkdir()
    env = _environment(tmp_path)
    assert console_scripts._forkable_script(args[0], env) is not None
    forked = console_scripts.run(args, env, tmp_path / "cwd", timeout=300)
    monkeypatch.setenv("NNUNET_KD_TEST_EXEC", "1")
    assert console_scripts._forkable_script(args[0], env) is None
    executed = console_scripts.run(args, env, tmp_path / "cwd", timeout=300)
    assert forked.returncode == executed.returncode
    assert forked.stdout == executed.stdout
    assert _significant(forked.stderr) == _significant(executed.stderr)
    assert forked.stdout or forked.stderr


def test_what_a_fork_cannot_reproduce_runs_as_an_executable(tmp_path):
    env = _environment(tmp_path)
    console_scripts.run(("nnunet_kd", "--help"), env, tmp_path, timeout=300)  # the server runs from here on
    assert console_scripts._forkable_script("nnunet_kd", env) is not None
    changed = {**env, "nnUNet_def_n_proc": str(int(env.get("nnUNet_def_n_proc", "8")) + 1)}
    assert console_scripts._forkable_script("nnunet_kd", changed) is None  # nnU-Net read the old value on import
    assert console_scripts._forkable_script("python", env) is None  # not a console script
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    (elsewhere / "nnunet_kd").write_text("#!/bin/sh\necho another nnunet_kd\n")
    (elsewhere / "nnunet_kd").chmod(0o755)
    shadowed = {**env, "PATH": os.pathsep.join([str(elsewhere), env["PATH"]])}
    assert console_scripts._forkable_script("nnunet_kd", shadowed) is None
    assert console_scripts.run(("nnunet_kd",), shadowed, tmp_path).stdout == "another nnunet_kd\n"
