#!/usr/bin/env bash
# The main job: install, then teacher, student and KD student on the generated dataset, ending in one table.
# Usage: bash setup_scripts/demo.sh [--workdir DIR] [--device cpu|cuda] [--fresh]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/setup_scripts/install.sh"
venv=${VIRTUAL_ENV:-$repo/.venv}
cd "$repo"
"$venv/bin/nnunet_kd" demo "$@"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "nnunet_kd and nnU-Net's commands are in $venv: 'source $venv/bin/activate' puts them on your PATH."
fi
