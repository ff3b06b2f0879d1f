#!/usr/bin/env bash
# One fast model from the 5-fold ensemble, measured: MSD Hippocampus 2d with a labelled test set outside every fold
# (`nnunet_kd holdout`), the teacher's five folds, stored targets of the 5-fold ensemble with mirroring and of fold 0
# alone with mirroring, then paired seeds of stored-target nnUNetTrainerKDLogits from each. Both studies predict the
# held-out test set (the teacher row: as the students learned from it), and `nnunet_kd study-compare` pairs
# ensemble-taught against fold-taught students by seed and case. The defaults are BENCHMARKS.md's five-seed run
# (2026-12-07): KDLogits alone (the plain student answers nothing this comparison asks; TRAINERS adds it).
#
# Usage: bash setup_scripts/studies/study_ensemble_targets.sh MSD_FOLDER [WORKDIR]
#   MSD_FOLDER  the Medical Segmentation Decathlon's Task04_Hippocampus folder
#   WORKDIR     nnU-Net folders, logs and the two studies (default: study_ensemble)
# Environment (defaults in brackets): TEST_CASES [40] labelled cases held out; SEEDS ["0 1 2 3 4"]; EPOCHS [30] x
#   ITERATIONS [50] for the students; TEACHER_SCHEDULE [20x50]; DEVICE [cpu]; TRAINERS [nnUNetTrainerKDLogits], or
#   "nnUNetTrainerStudent nnUNetTrainerKDLogits" for plain students too (trained once, reused by the second study);
#   TARGETS_RUNTIME [openvino on cpu, torch on cuda]: what runs the teacher for its targets.
# Measured on a 2-core CPU with the defaults: teachers 12 min each, fold 0's targets 1 min 40 s and the ensemble's
#   8.5 min (OpenVINO, mirrored), student runs 7.8 min: about 2 h 50 min. Everything runs in turn: two nnU-Net
#   trainings at once ran 1.7x slower than one after the other on 2 cores.
# Seeds run in turn, each in both studies; re-running continues where it stopped.
# A CPU check of the whole chain: TEST_CASES=4 SEEDS="0 1" TEACHER_SCHEDULE=debug EPOCHS=1 ITERATIONS=2 \
#   bash setup_scripts/studies/study_ensemble_targets.sh MSD_FOLDER /tmp/ensemble_check
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give the MSD Task04_Hippocampus folder}" && pwd)
work=$(mkdir -p "${2:-study_ensemble}" && cd "${2:-study_ensemble}" && pwd)
test_cases=${TEST_CASES:-40} seeds=${SEEDS:-0 1 2 3 4} epochs=${EPOCHS:-30} iterations=${ITERATIONS:-50}
device=${DEVICE:-cpu} teacher_trainer=nnUNetTrainer_${TEACHER_SCHEDULE:-20x50}
read -r -a trainers <<< "${TRAINERS:-nnUNetTrainerKDLogits}"
runtime=${TARGETS_RUNTIME:-$([ "$device" = cpu ] && echo openvino || echo torch)}
suffix=$([ "$runtime" = torch ] || echo "__$runtime")  # teacher-targets names what did not run under torch
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
id=104 dataset=Dataset104_HippocampusHoldout$test_cases plans=nnUNetPlans_bs32
students=${plans}_KDStudent_w0.25 teacher=${teacher_trainer}__${plans}__2d
mkdir -p "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "preparing $source_dir: $test_cases held-out test cases, 2d, batch 32, student width 0.25"
nnunet_kd prepare "$source_dir" -c 2d --holdout "$test_cases" --holdout-id $id --batch-size 32 --widths 0.25 \
  > "$work/logs/prepare.log"

for fold in 0 1 2 3 4; do
  folder=$nnUNet_results/$dataset/$teacher/fold_$fold
  [ -f "$folder/validation/summary.json" ] && continue
  resume=(); [ -f "$folder/checkpoint_latest.pth" ] && resume=(--c)
  step "teacher fold $fold: $teacher_trainer -p $plans (log: $work/logs/teacher_fold$fold.log)"
  nnUNetv2_train $id 2d $fold -tr "$teacher_trainer" -p $plans -device "$device" "${resume[@]}" \
    >> "$work/logs/teacher_fold$fold.log" 2>&1
done

targets() {  # targets(folds): the teacher's targets with mirroring, as nnU-Net predicts
  step "teacher targets, folds $1, mirroring, $runtime"
  local log=$work/logs/targets_f${1// /}
  # shellcheck disable=SC2086  # the fold list is meant to split
  nnunet_kd teacher-targets $id -c 2d -p $plans --teacher "$teacher" -f $1 --runtime "$runtime" -device "$device" \
    > "$log.log" 2> "$log.err"
}
targets "0"
targets "0 1 2 3 4"

test_set=(--test-images "$nnUNet_raw/$dataset/imagesTs" --test-labels "$nnUNet_raw/$dataset/labelsTs")
study() {  # study(targets, folder, seeds, ...): the trainers from these targets, the test set
  # shellcheck disable=SC2086
  nnunet_kd study $id -c 2d -p $students --teacher "$teacher" --trainers "${trainers[@]}" \
    --seeds $3 --epochs "$epochs" --iterations "$iterations" --val-iterations 10 --device "$device" \
    "${test_set[@]}" --teacher-targets "$1$suffix" -o "$2" "${@:4}"
}
reuse=()  # plain students do not learn from the targets: the ensemble's study reuses fold 0's
[ "${#trainers[@]}" -gt 1 ] && reuse=(--baseline-from "$work/study_fold0")
done_seeds=""
for seed in $seeds; do  # seed by seed: what has finished when the run is stopped is paired across the two studies
  done_seeds="$done_seeds $seed" time_cases=0
  [ "$seed" = "${seeds##* }" ] && time_cases=3  # CPU timings once, in the last reports
  study "${teacher}__f0" "$work/study_fold0" "$done_seeds" --time-cases $time_cases
  study "${teacher}__f0-1-2-3-4" "$work/study_ensemble" "$done_seeds" --time-cases $time_cases "${reuse[@]}"
done
nnunet_kd study-compare "$work/study_fold0" "$work/study_ensemble" -o "$work/ensemble_vs_fold0.md"
