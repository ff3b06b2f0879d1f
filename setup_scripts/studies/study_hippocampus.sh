#!/usr/bin/env bash
# Does distillation pay off on real data? MSD Task04 Hippocampus, by default in nnU-Net's 2d configuration sized for a
# CPU: conversion, planning, a batch-32 plans variant, the teacher, student plans, then `nnunet_kd study` and its
# report. setup_scripts/studies/study_hippocampus_gpu.sh runs the same in 3d_fullres on one GPU.
#
# Usage: bash setup_scripts/studies/study_hippocampus.sh MSD_FOLDER [WORKDIR]
#   MSD_FOLDER  the Medical Segmentation Decathlon's Task04_Hippocampus folder (imagesTr, labelsTr, dataset.json)
#   WORKDIR     nnU-Net folders, logs and the studies (default: study_hippocampus)
# Environment (defaults in brackets):
#   WIDTHS ["0.25"]   student widths; one study per width, in WORKDIR/study_<config>_w<width>
#   TRAINERS ["nnUNetTrainerStudent nnUNetTrainerKDLogits"]   the first is the no-KD baseline
#   SEEDS ["0 1 2"]   EPOCHS [40] x ITERATIONS [50]: the students' schedule   DEVICE [cpu]   JOBS [1]: runs at once
#   CONFIG [2d]: 2d trains on a batch-32 variant of nnU-Net's plans; 3d_fullres on nnU-Net's own plans
#   TEACHER_SCHEDULE [40x50]: the teacher is nnUNetTrainer_<TEACHER_SCHEDULE> (trainers/nnUNetTrainer_schedules.py)
#   FOLD [0]: the cross-validation fold the teacher and the students train on and are validated on. Settings are
#     chosen on another fold than the one reported (fold 1 here, fold 0 in BENCHMARKS.md); FOLD other than 0 writes
#     WORKDIR/study_<config>_w<width>_fold<FOLD>
# Re-running continues where it stopped; more TRAINERS or SEEDS later extend the same study.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# the environment setup_scripts/install.sh made, unless another one is active
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give the MSD Task04_Hippocampus folder}" && pwd)
work=$(mkdir -p "${2:-study_hippocampus}" && cd "${2:-study_hippocampus}" && pwd)
widths=${WIDTHS:-0.25}
trainers=${TRAINERS:-nnUNetTrainerStudent nnUNetTrainerKDLogits}
seeds=${SEEDS:-0 1 2}
epochs=${EPOCHS:-40} iterations=${ITERATIONS:-50} device=${DEVICE:-cpu} jobs=${JOBS:-1}
cfg=${CONFIG:-2d} teacher=nnUNetTrainer_${TEACHER_SCHEDULE:-40x50} fold=${FOLD:-0}
# fold 0 keeps the names of the first studies
suffix=$([ "$fold" = 0 ] || echo "_fold$fold")

export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
# two CPU cores: two augmentation workers keep the network busy without starving it
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
id=4 dataset=Dataset004_Hippocampus
mkdir -p "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }

# conversion, nnU-Net's planning and preprocessing, and the students' plans; in 2d with a batch-32 variant of nnU-Net's
# plans: nnU-Net plans the 2d batch as large as 5 % of the dataset allows (309 here), a CPU wants 32. Same
# data_identifier, so the variant trains on the data just preprocessed.
prepare=(); plans=nnUNetPlans
[ "$cfg" = 2d ] && prepare=(--batch-size 32) plans=nnUNetPlans_bs32
step "preparing $source_dir ($cfg, student widths $widths)"
# shellcheck disable=SC2086  # the width list is meant to split
nnunet_kd prepare "$source_dir" -c "$cfg" "${prepare[@]}" --widths $widths > "$work/logs/prepare_$cfg.log"

teacher_fold=$nnUNet_results/$dataset/${teacher}__${plans}__${cfg}/fold_$fold
if [ ! -f "$teacher_fold/validation/summary.json" ]; then
  resume=(); [ -f "$teacher_fold/checkpoint_latest.pth" ] && resume=(--c)
  step "training the teacher: $teacher -p $plans (log: $work/logs/teacher_$cfg$suffix.log)"
  nnUNetv2_train $id "$cfg" "$fold" -tr "$teacher" -p $plans -device "$device" "${resume[@]}" \
    >> "$work/logs/teacher_$cfg$suffix.log" 2>&1
fi
grep -h "Mean Validation Dice" "$work/logs/teacher_$cfg$suffix.log" | tail -1 || true

for width in $widths; do
  # shellcheck disable=SC2086  # word splitting of the lists is intended
  nnunet_kd study $id -c "$cfg" -p "${plans}_KDStudent_w${width}" --teacher "${teacher}__${plans}__${cfg}" \
    --trainers $trainers --seeds $seeds --epochs "$epochs" --iterations "$iterations" --val-iterations 10 \
    --device "$device" --jobs "$jobs" --fold "$fold" -o "$work/study_${cfg}_w${width}$suffix"
done
