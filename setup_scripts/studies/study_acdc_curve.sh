#!/usr/bin/env bash
# The distillation curve on multi-class cardiac MRI: ACDC (RV, myocardium, LV; 70 patients x end-diastole and
# end-systole), nnU-Net 2d. 20 patients (both phases) are held out as a test set outside every fold, and the folds keep
# a patient's two phases together (--group-pattern, as nnU-Net's own ACDC conversion splits). A stock nnU-Net teacher
# on its five folds, the 5-fold ensemble's stored targets with mirroring, then at each student width paired seeds of
# the plain student and of KDLogits from the ensemble's targets (STAGE=all: at the two smallest widths also
# KDClassAffinity and KDLogitMatching from the same targets), every run predicting the test set.
#
# Usage: bash setup_scripts/studies/study_acdc_curve.sh SHARED_DATA_DIR [WORKDIR]
#   SHARED_DATA_DIR  the folder holding ACDC/ (nnU-Net raw layout: imagesTr, labelsTr, dataset.json)
#   WORKDIR          nnU-Net folders, logs and one study per width (default: study_acdc)
# Environment (defaults in brackets): STAGE [core]; WIDTHS ["0.25 0.0625 0.125 0.5"] (the core's order: the sizes
#   that answer most first); SEEDS ["0 1 2 3 4"]; EPOCHS [40] x ITERATIONS [50] for the students;
#   TEACHER_SCHEDULE [60x50]; BATCH [12]; DEVICE [cpu]; TARGETS_RUNTIME [torch]: openvino runs the ensemble's targets
#   on the CPU 3.3x faster per case (measured on Hippocampus 2d, docs/stored-targets.md), within float rounding.
# Runs: the teacher's 5 folds, the ensemble's targets (100 training cases x 5 folds x 4 mirrored passes), then per
#   width 5 seeds x 2 trainers (core: 40 student runs), STAGE=all + 2 widths x 5 seeds x 2 trainers (20).
# Sizes (2d, 256x224 patches, as nnU-Net plans ACDC): teacher 20,621,076 parameters; w0.5 5,160,340; w0.25
#   1,292,628; w0.125 324,436; w0.0625 82,344 (its first stages at the 4-feature floor).
# Timing (2026-12-07, 2-core Intel Xeon, the CPU check below): prepare 56 s; the full-width teacher's epoch of 3
#   training and 2 validation iterations at batch 12 29-31 s (about 8 s per training iteration), its final validation
#   of a fold (about 20 cases, mirrored) about 4 min. So a 60x50 teacher fold takes about 7 hours on 2 CPU cores and
#   the five about 35: a GPU's work (DEVICE=cuda runs the same script), or many sessions. The ensemble's targets (5
#   folds x 4 mirrored passes, torch) took 270 s for the first case beside another training run: hours for the 100.
# The check below ran through preparing, the grouped folds and the five teacher folds (debug, 6-12 min each with
#   their validation), and was stopped in the ensemble's targets.
# Each study reports per-class test Dice, the paired interval, parameters, FLOPs per tile and CPU seconds per case;
#   `nnunet_kd study-compare` pairs any two of them, and `nnunet_kd study-curve` draws them all against student size
#   (WORKDIR/curve: curve.md, curve.csv, curve.png), with the ensemble and fold 0 as lines; `nnunet_kd bench predict`
#   times whole nnUNetv2_predict calls of the ensemble (mirrored) and of each width's student (--disable_tta).
# Re-running continues where it stopped; seeds run in turn at every width, so that what has finished is paired.
# A CPU check of the whole chain: SEEDS="0" WIDTHS="0.0625" TEACHER_SCHEDULE=debug EPOCHS=1 ITERATIONS=2 \
#   bash setup_scripts/studies/study_acdc_curve.sh SHARED_DATA_DIR /tmp/acdc_check
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give the shared data folder that holds ACDC/}" && pwd)/ACDC
work=$(mkdir -p "${2:-study_acdc}" && cd "${2:-study_acdc}" && pwd)
stage=${STAGE:-core} widths=${WIDTHS:-0.25 0.0625 0.125 0.5} seeds=${SEEDS:-0 1 2 3 4}
epochs=${EPOCHS:-40} iterations=${ITERATIONS:-50} batch=${BATCH:-12} device=${DEVICE:-cpu}
teacher_trainer=nnUNetTrainer_${TEACHER_SCHEDULE:-60x50}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
id=631 dataset=Dataset631_ACDCHoldout40 plans=nnUNetPlans_bs$batch
teacher=${teacher_trainer}__${plans}__2d targets=${teacher_trainer}__${plans}__2d__f0-1-2-3-4
mkdir -p "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "preparing $source_dir: 20 held-out patients (40 cases), folds by patient, 2d, batch $batch, widths $widths"
# shellcheck disable=SC2086  # the width list is meant to split
nnunet_kd prepare "$source_dir" --dataset-id 630 -c 2d --holdout 40 --holdout-id $id --group-pattern '(patient\d+)_' \
  --batch-size "$batch" --widths $widths > "$work/logs/prepare.log"

for fold in 0 1 2 3 4; do
  folder=$nnUNet_results/$dataset/$teacher/fold_$fold
  [ -f "$folder/validation/summary.json" ] && continue
  resume=(); [ -f "$folder/checkpoint_latest.pth" ] && resume=(--c)
  step "teacher fold $fold: $teacher_trainer -p $plans (log: $work/logs/teacher_fold$fold.log)"
  nnUNetv2_train $id 2d $fold -tr "$teacher_trainer" -p "$plans" -device "$device" "${resume[@]}" \
    >> "$work/logs/teacher_fold$fold.log" 2>&1
done

if [ ! -f "$nnUNet_preprocessed/$dataset/kd_targets/$targets/manifest.json" ] || \
   ! grep -q '"finished"' "$nnUNet_preprocessed/$dataset/kd_targets/$targets/manifest.json"; then
  step "the 5-fold ensemble's stored targets, mirroring as nnU-Net predicts"
  nnunet_kd teacher-targets $id -c 2d -p "$plans" --teacher "$teacher" -f 0 1 2 3 4 -device "$device" \
    --runtime "${TARGETS_RUNTIME:-torch}" --name "$targets" > "$work/logs/targets.log" 2>&1
fi

test_set=(--test-images "$nnUNet_raw/$dataset/imagesTs" --test-labels "$nnUNet_raw/$dataset/labelsTs")
study() {  # study(width, seeds, trainers ...)
  # shellcheck disable=SC2086  # the seed list is meant to split
  nnunet_kd study $id -c 2d -p "${plans}_KDStudent_w$1" --teacher "$teacher" --teacher-targets "$targets" \
    --seeds $2 --epochs "$epochs" --iterations "$iterations" --val-iterations 10 --device "$device" \
    "${test_set[@]}" --group-pattern '(patient\d+)_' --time-cases "$time_cases" -o "$work/study_w$1" \
    --trainers "${@:3}" >> "$work/logs/study_w$1.log" 2>&1  # a patient's two frames count once in every interval
}
read -r -a by_size <<< "$(printf '%s\n' $widths | sort -g | tr '\n' ' ')"  # smallest first
done_seeds=""
for seed in $seeds; do
  done_seeds="$done_seeds $seed" time_cases=0
  [ "$seed" = "${seeds##* }" ] && time_cases=3  # CPU timings once, in the last reports
  for width in $widths; do
    trainers=(nnUNetTrainerStudent nnUNetTrainerKDLogits)
    if [ "$stage" = all ] && { [ "$width" = "${by_size[0]}" ] || [ "$width" = "${by_size[1]:-}" ]; }; then
      trainers+=(nnUNetTrainerKDClassAffinity nnUNetTrainerKDLogitMatching)
    fi
    step "width $width, seeds$done_seeds: ${trainers[*]} (log: $work/logs/study_w$width.log)"
    study "$width" "$done_seeds" "${trainers[@]}"
  done
done
# fold 0 of the teacher alone on the test set, mirrored: the single model the ensemble's line is compared with
fold0=$work/teacher_fold0_test
if [ ! -f "$fold0/summary.json" ]; then
  step "the teacher's fold 0 on the test set (log: $work/logs/teacher_fold0_test.log)"
  nnUNetv2_predict -i "$nnUNet_raw/$dataset/imagesTs" -o "$fold0" -d $id -c 2d -f 0 -tr "$teacher_trainer" \
    -p "$plans" -device "$device" > "$work/logs/teacher_fold0_test.log" 2>&1
  nnUNetv2_evaluate_folder "$nnUNet_raw/$dataset/labelsTs" "$fold0" -djfile "$fold0/dataset.json" \
    -pfile "$fold0/plans.json" >> "$work/logs/teacher_fold0_test.log" 2>&1
fi
step DONE
for width in $widths; do
  echo "== width $width"
  cat "$work/study_w$width/report.md"
done
# what a user waits for, per size: whole nnUNetv2_predict calls on 5 test cases, the 5-fold ensemble with mirroring
# against each width's KD student (seed 0) without, interleaved (BENCH_REPEATS [3]; the studies' reports time the
# networks alone)
calls=$work/curve/prediction_calls
if [ ! -f "$calls.json" ]; then
  mkdir -p "$work/bench_cases" "$work/curve"
  images=("$nnUNet_raw/$dataset/imagesTs/"*_0000.nii.gz)
  for image in "${images[@]:0:5}"; do ln -sf "$image" "$work/bench_cases/"; done
  models=("$nnUNet_results/$dataset/$teacher::-f 0 1 2 3 4")
  for width in $widths; do
    models+=("$work/study_w$width/runs/seed_0/$dataset/nnUNetTrainerKDLogits__${plans}_KDStudent_w${width}__2d::--disable_tta")
  done
  step "whole prediction calls: the ensemble and the students (log: $work/logs/bench_predict.log)"
  nnunet_kd bench predict "${models[@]}" -i "$work/bench_cases" --variants defaults --repeats "${BENCH_REPEATS:-3}" \
    -o "$calls.md" --json "$calls.json" > "$work/logs/bench_predict.log" 2>&1
fi
cat "$calls.md"
# the figure: test Dice against parameters, plain and KD with their intervals; the myocardium alone in a second panel
# shellcheck disable=SC2046  # one study folder per width
nnunet_kd study-curve $(printf "$work/study_w%s " $widths) -o "$work/curve" --class MYO \
  --line "teacher, fold 0, mirrored=$fold0/summary.json"  # grouped by patient, as the studies are
