#!/usr/bin/env bash
# Install, lint, and run the whole test suite (unit tests and nnU-Net CLI end-to-end tests, CPU only).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/setup_scripts/install.sh"
venv=${VIRTUAL_ENV:-$repo/.venv}
cd "$repo"
"$venv/bin/ruff" check .
# pytest exits 5 when it collects no test; set -e turns that, like any failure, into a failed run
# -n auto: one worker per core, each taking whole test files (their module fixtures are built once)
"$venv/bin/python" -m pytest tests -v --durations=15 -n auto --dist loadfile --no-loadscope-reorder "$@"
