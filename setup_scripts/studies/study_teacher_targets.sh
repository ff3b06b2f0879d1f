#!/usr/bin/env bash
# Stored teacher targets on real data (MSD Hippocampus 2d, after setup_scripts/studies/study_hippocampus.sh): write the fold-0
# teacher's targets, time a KD step from them against online KD with one and with five teacher networks (data loader
# included), and train stored-target KDLogits on the study's seeds, to compare with online KDLogits seed by seed.
#
# Usage: bash setup_scripts/studies/study_teacher_targets.sh [WORKDIR]   (the WORKDIR study_hippocampus.sh used)
# Environment: SEEDS ["0 1 2"], EPOCHS [40] x ITERATIONS [50], TTA [0]: 1 stores the teacher with mirroring,
# TRAINERS ["nnUNetTrainerStudent nnUNetTrainerKDLogits"]: the baseline first, then any output-space KD trainers.
# Without mirroring (the default) the stored teacher is the online teacher's own function, so the comparison isolates
# storing the outputs (clean image, no intensity augmentation, patch padding masked) from a better teacher.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
work=$(cd "${1:-study_hippocampus}" && pwd)
seeds=${SEEDS:-0 1 2} epochs=${EPOCHS:-40} iterations=${ITERATIONS:-50}
trainers=${TRAINERS:-nnUNetTrainerStudent nnUNetTrainerKDLogits}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
dataset=Dataset004_Hippocampus teacher=nnUNetTrainer_40x50__nnUNetPlans_bs32__2d students=nnUNetPlans_bs32_KDStudent_w0.25
tta=(--disable_tta) name=${teacher}__f0__nomirror study=$work/study_2d_w0.25_stored
[ "${TTA:-0}" = 1 ] && tta=() name=${teacher}__f0 study=$work/study_2d_w0.25_stored_tta
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "teacher targets -> $nnUNet_preprocessed/$dataset/kd_targets/$name"
nnunet_kd teacher-targets 4 -c 2d -p nnUNetPlans_bs32 --teacher $teacher -f 0 "${tta[@]}" -device cpu

# five networks (folds 0 and 1 repeated where more folds are not trained) cost what a 5-fold ensemble costs
folds1="0" folds5="0 0 0 0 0"
[ -f "$nnUNet_results/$dataset/$teacher/fold_1/checkpoint_final.pth" ] && folds5="0 1 0 1 0"
for folds in "$folds1" "$folds5"; do
  step "bench step, online teacher folds $folds"
  # shellcheck disable=SC2086  # the fold list is meant to split
  nnunet_kd bench step 4 -c 2d -p $students --trainers nnUNetTrainerStudent nnUNetTrainerKDLogits \
    --teacher "$nnUNet_results/$dataset/$teacher" --teacher-folds $folds --teacher-targets "$name" --warmup 3 \
    --repeats 10 --json "$work/logs/bench_step_targets_$(echo "$folds" | tr -d ' ').json"
done

# the main study's plain runs (same plans, schedule and seeds) are reused, not retrained
reuse=()
if [ -f "$work/study_2d_w0.25/study.json" ]; then reuse=(--baseline-from "$work/study_2d_w0.25"); fi
# shellcheck disable=SC2086
nnunet_kd study 4 -c 2d -p $students --teacher $teacher --trainers $trainers \
  --seeds $seeds --epochs "$epochs" --iterations "$iterations" --val-iterations 10 --device cpu \
  --teacher-targets "$name" -o "$study" "${reuse[@]}"
