#!/usr/bin/env bash
# What a user waits for on a CPU: whole prediction calls of the demo's teacher, its KD student and that student
# exported (predict-onnx: OpenVINO with tiles in batches, and ONNX Runtime tile by tile as before), with nnU-Net's
# speed flags, on the demo's held-out cases and on a CT-sized generated volume; on that volume also the network stage
# under every runtime and tile batch (`nnunet_kd bench runtimes`) for the student and the teacher.
#
# Usage: bash setup_scripts/studies/benchmark_cpu_prediction.sh [DEMO_WORKDIR] [OUT]
#   DEMO_WORKDIR  the demo's folder (default: nnunet_kd_demo; made by `nnunet_kd demo` if missing)
#   OUT           exports, the generated volume and the tables (default: benchmark_cpu_prediction)
# Environment: REPEATS [2] calls per model and flag set on the demo cases; LARGE_SHAPE ["160 160 160"] (z y x voxels).
# Run it on an otherwise idle machine: the models' calls are interleaved, but other load still skews the ratios.
# Time on 2 cores: about 35 min, most of it the teacher's calls on the large volume (9 min with mirroring).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
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
if [ ! -f "$out/teacher_onnx/nnunet_kd_export.json" ]; then
  step "exporting the teacher to ONNX (for the runtime comparison)"
  nnunet_kd export -m "$teacher" -f 0 -o "$out/teacher_onnx"
fi
# the export as predict-onnx ran it before tile batches and OpenVINO: ONNX Runtime, one tile per call
onnx_before="$out/student_onnx::--runtime onnxruntime --tile-batch 1"
# bfloat16 rows only where the CPU has bfloat16 units (predict-onnx refuses it elsewhere)
bf16_demo=() bf16_large=()
if python -c "import openvino, sys; sys.exit('BF16' not in openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))"
then
  bf16_demo=("$out/student_onnx::--precision bf16") bf16_large=("$out/student_onnx::--disable_tta --precision bf16")
fi

step "demo's held-out cases: whole calls, flags and their Dice"
nnunet_kd bench predict "$teacher" "$student" "$onnx_before" "$out/student_onnx" \
  "${bf16_demo[@]}" \
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
step "a CT-sized volume, network stage: every runtime and tile batch against nnU-Net's own loop"
nnunet_kd bench runtimes "$student" --export "$out/student_onnx" -i "$large/imagesTs" --cases 1 \
  --tile-batches 1 2 4 8 --runtimes torch torch-stock openvino onnxruntime \
  -o "$out/runtimes_student.md" --json "$out/runtimes_student.json"
nnunet_kd bench runtimes "$teacher" --export "$out/teacher_onnx" -i "$large/imagesTs" --cases 1 \
  --tile-batches 1 4 --runtimes torch openvino onnxruntime -o "$out/runtimes_teacher.md" --json "$out/runtimes_teacher.json"
step "a CT-sized volume, whole calls: the teacher with and without mirroring against the students without"
nnunet_kd bench predict "$teacher" "$teacher::--disable_tta" "$student::--disable_tta" "$onnx_before --disable_tta" \
  "$out/student_onnx::--disable_tta" "${bf16_large[@]}" \
  -i "$large/imagesTs" -l "$large/labelsTs" --variants "-npp 0 -nps 0" --repeats 1 --no-stages \
  -o "$out/large_volume.md" --json "$out/large_volume.json"
step "tables: $out/demo_cases.md, $out/runtimes_student.md, $out/runtimes_teacher.md, $out/large_volume.md"
