#!/usr/bin/env bash
# What a user waits for on a CPU: whole prediction calls of the demo's teacher, its KD student and that student
# exported to ONNX, with nnU-Net's speed flags, on the demo's held-out cases and on a CT-sized generated volume.
#
# Usage: bash setup_scripts/benchmark_cpu_prediction.sh [DEMO_WORKDIR] [OUT]
#   DEMO_WORKDIR  the demo's folder (default: nnunet_kd_demo; made by `nnunet_kd demo` if missing)
#   OUT           exports, the generated volume and the tables (default: benchmark_cpu_prediction)
# Environment: REPEATS [2] calls per model and flag set on the demo cases; LARGE_SHAPE ["160 160 160"] (z y x voxels).
# Run it on an otherwise idle machine: the models' calls are interleaved, but other load still skews the ratios.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
demo=${1:-nnunet_kd_demo}
[ -d "$demo/results" ] || nnunet_kd demo --workdir "$demo"
demo=$(cd "$demo" && pwd)
out=$(mkdir -p "${2:-benchmark_cpu_prediction}" && cd "${2:-benchmark_cpu_prediction}" && pwd)
export nnUNet_raw=$demo/raw nnUNet_preprocessed=$demo/preprocessed nnUNet_results=$demo/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
step() { echo "[$(date +%H:%M:%S)] $*"; }

R=$nnUNet_results/Dataset900_KDSynthetic
teacher=$R/nnUNetTrainer_demo__nnUNetPlans__3d_fullres
student=$R/nnUNetTrainerKDLogits_demo__nnUNetPlans_KDStudent_w0.25__3d_fullres
if [ ! -f "$out/student_onnx/nnunet_kd_export.json" ]; then
  step "exporting the KD student to ONNX"
  nnunet_kd export -m "$student" -f 0 -o "$out/student_onnx"
fi

step "demo's held-out cases: whole calls, flags and their Dice"
nnunet_kd bench predict "$teacher" "$student" "$out/student_onnx" \
  -i "$nnUNet_raw/Dataset900_KDSynthetic/imagesTs" -l "$nnUNet_raw/Dataset900_KDSynthetic/labelsTs" \
  --variants "defaults; --disable_tta; --disable_tta -npp 0 -nps 0" --repeats "${REPEATS:-2}" \
  -o "$out/demo_cases.md" --json "$out/demo_cases.json"

# shellcheck disable=SC2206  # the shape is three words on purpose
shape=(${LARGE_SHAPE:-160 160 160})
large=$out/large_raw/Dataset990_KDSynthetic
if [ ! -d "$large/imagesTs" ]; then
  step "generating one ${shape[*]} volume with the demo's spacing"
  nnunet_kd generate-dataset --raw "$out/large_raw" --dataset-id 990 --num-training 1 --num-test 1 \
    --shape "${shape[@]}" --seed 7
fi
step "a CT-sized volume: the network dominates; mirroring off (it multiplies the network time by 8 for every model)"
nnunet_kd bench predict "$teacher" "$student" "$out/student_onnx" -i "$large/imagesTs" -l "$large/labelsTs" \
  --variants "--disable_tta -npp 0 -nps 0" --repeats 1 --no-stages \
  -o "$out/large_volume.md" --json "$out/large_volume.json"
step "tables: $out/demo_cases.md, $out/large_volume.md"
