#!/usr/bin/env bash
# Install nnunet-kd with nnU-Net v2, ONNX export and the test tools.
# Target: the active virtual environment if there is one, else <repo>/.venv (created on first use; reused after).
# torch: an installed torch (CUDA or CPU build) that satisfies the requirement is kept as it is. To choose a build
# yourself, install it first, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VIRTUAL_ENV:-$repo/.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating virtual environment $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
echo "== installing nnunet-kd into $venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -e "$repo[test]" 2>&1 \
  | grep -v "^WARNING: Location '.*' is ignored" || true
# pip's exit status is lost in the pipe above: check that the install is usable
"$venv/bin/python" -c "import nnunet_kd, nnunetv2, torch; print('nnunet-kd', nnunet_kd.__version__, '| torch', torch.__version__)"
