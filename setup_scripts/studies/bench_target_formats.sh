#!/usr/bin/env bash
# Stored-target formats measured: dense float16 against top-k, on a generated 50-class dataset and, given its MSD
# folder, on MSD Hippocampus (3 classes): disk per case, nnU-Net's training loader seconds per batch, and the KD losses
# and their gradients against dense targets for a trained student (`nnunet_kd bench targets`). Each dataset: nnU-Net
# 2d with a CPU batch of 32, the stock teacher, a plain w0.25 student, the teacher's dense targets of fold 0 without
# mirroring, then the bench. Resumable: finished steps are skipped.
#
# Usage: bash setup_scripts/studies/bench_target_formats.sh [WORKDIR] [MSD_HIPPOCAMPUS_FOLDER]   (WORKDIR: bench_targets)
# Environment: NUM_CLASSES [50]; TEACHER_SCHEDULE [40x50] (nnUNetTrainer_<schedule>); STUDENT_EPOCHS [10] x 50
#   iterations of the plain student; DEVICE [cpu]; SKIP_GENERATED=1 for Hippocampus alone.
# Measured on a 2-core CPU shared with other runs (50 classes): teacher 40 x 50 iterations ~90 min, student ~20 min,
#   dense targets ~2 min, the bench ~5 min. Hippocampus: a few minutes per step.
# A CPU check of the chain: NUM_CLASSES=8 TEACHER_SCHEDULE=debug STUDENT_EPOCHS=1 bash $0 /tmp/formats_check
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
work=$(mkdir -p "${1:-bench_targets}" && cd "${1:-bench_targets}" && pwd)
classes=${NUM_CLASSES:-50} device=${DEVICE:-cpu} teacher_trainer=nnUNetTrainer_${TEACHER_SCHEDULE:-40x50}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1}
plans=nnUNetPlans_bs32 students=nnUNetPlans_bs32_KDStudent_w0.25 teacher=${teacher_trainer}__nnUNetPlans_bs32__2d
mkdir -p "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }

# bench_formats ID DATASET_NAME TOP_K...: from planning to the bench table, for one raw dataset
bench_formats() {
  local id=$1 dataset=$2
  shift 2
  local student_folder=$nnUNet_results/$dataset/nnUNetTrainerStudent__${students}__2d log=$work/logs/$dataset
  [ -d "$nnUNet_preprocessed/$dataset/nnUNetPlans_2d" ] || { step "$dataset: plan"; nnUNetv2_plan_and_preprocess \
    -d "$id" -c 2d --verify_dataset_integrity -np 2 > "$log.plan.log"; }
  nnunet_kd batch-plans "$id" -c 2d --batch-size 32 > /dev/null
  nnunet_kd student-plans "$id" -c 2d -p $plans --width 0.25 > /dev/null
  if [ ! -f "$nnUNet_results/$dataset/$teacher/fold_0/checkpoint_final.pth" ]; then
    step "$dataset: teacher"
    nnUNetv2_train "$id" 2d 0 -tr "$teacher_trainer" -p $plans -device "$device" > "$log.teacher.log"
  fi
  if [ ! -f "$student_folder/fold_0/checkpoint_final.pth" ]; then
    step "$dataset: student"; nnUNet_KD_num_epochs=${STUDENT_EPOCHS:-10} nnUNet_KD_iterations_per_epoch=50 \
      nnUNet_KD_val_iterations_per_epoch=5 nnUNetv2_train "$id" 2d 0 -tr nnUNetTrainerStudent -p $students \
      -device "$device" > "$log.student.log"
  fi
  step "$dataset: dense targets"
  nnunet_kd teacher-targets "$id" -c 2d -p $plans --teacher "$teacher" -f 0 --disable_tta -device "$device" \
    > "$log.targets.log"
  step "$dataset: bench"
  nnunet_kd bench targets "$id" --targets "${teacher}__f0__nomirror" --student "$student_folder" -c 2d -p $students \
    --top-k "$@" --cases 4 --json "$work/bench_targets_$dataset.json" | tee "$work/bench_targets_$dataset.txt"
}

if [ "${SKIP_GENERATED:-0}" != 1 ]; then
  [ -f "$nnUNet_raw/Dataset920_KDManyClasses$classes/dataset.json" ] || nnunet_kd generate-dataset \
    --num-classes "$classes" --dataset-id 920 --num-training 12 --num-test 4
  bench_formats 920 "Dataset920_KDManyClasses$classes" 2 4 8
fi
if [ -n "${2:-}" ]; then
  [ -f "$nnUNet_raw/Dataset004_Hippocampus/dataset.json" ] || nnUNetv2_convert_MSD_dataset -i "$2" > /dev/null
  bench_formats 4 Dataset004_Hippocampus 1 2
fi
