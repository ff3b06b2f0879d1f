#!/usr/bin/env bash
# Issue #13's table: the two-stage vertebra pipeline with a stage-2 teacher, the same small student alone and
# distilled (nnUNetTrainerKDLogits, same initial weights), against the one-shot multi-label nnU-Net, on generated
# spines: trained on TRAIN_SCANS scans (fold 0), scored on TEST_SCANS other generated scans none of them saw.
# Every model is trained by the stock `nnUNetv2_train`; re-running continues where it stopped.
#
# Usage: bash setup_scripts/studies/benchmark_spine.sh [WORKDIR]
# Environment: TRAIN_SCANS [30], TEST_SCANS [10], SCHEDULE [20x50] (the named schedule of every model, e.g. debug,
# 40x50, 100epochs), STAGE2_SPACING [3] mm (stage 2 and the one-shot baseline; the scans are 2 mm), BATCH [2] (every
# model's batch; nnU-Net plans 13 for stage 2, for a GPU; empty keeps nnU-Net's), WIDTH [0.25] (the student),
# SEEDS [0] (one pair of stage-2 students, alone and distilled, per seed; seed N > 0 trains into seeds/seed_N/results),
# DEVICE [cpu], TTA [0] (1 predicts with mirroring), REAL [] (a VerSe-style folder of real scans: the same two-stage
# models predict and are scored on it too, e.g. the TPTBox crop that setup_scripts/studies/spine_smoke_tptbox.sh lays out),
# ONE_SHOT [1] (0 leaves out the one-shot baseline, the longest model to train, to check the two-stage rows alone).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
work=$(mkdir -p "${1:-spine_benchmark}" && cd "${1:-spine_benchmark}" && pwd)
train_scans=${TRAIN_SCANS:-30} test_scans=${TEST_SCANS:-10} schedule=${SCHEDULE:-20x50} width=${WIDTH:-0.25}
device=${DEVICE:-cpu} stage2_spacing=${STAGE2_SPACING:-3} batch=${BATCH-2} seeds=${SEEDS:-0}
tta=(--disable_tta)
[ "${TTA:-0}" = 1 ] && tta=()
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-$(nproc)}
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }
stage1=Dataset521_SpineLocation stage2=Dataset522_SpineVertebrae one_shot=Dataset523_SpineOneShot
plans=nnUNetPlans${batch:+_bs$batch}
students=${plans}_KDStudent_w$width

if [ ! -d "$work/scans_test" ]; then
  step "generating $train_scans training and $test_scans test spines"
  nnunet_kd spine generate "$work/scans_train" -n "$train_scans" --seed 0
  nnunet_kd spine generate "$work/scans_test" -n "$test_scans" --seed 1000
fi
if [ ! -f "$nnUNet_preprocessed/$one_shot/nnUNetPlans.json" ]; then
  step "converting (stage 2 at $stage2_spacing mm) and planning"
  rm -rf "$nnUNet_raw"/Dataset52[123]_*
  nnunet_kd spine convert "$work/scans_train" --id 521 --stage2-spacing "$stage2_spacing"
  nnUNetv2_plan_and_preprocess -d 521 522 523 -c 3d_fullres -np 2 > "$work/logs/plan_and_preprocess.log"
fi
if [ -n "$batch" ]; then
  for id in 521 522 523; do nnunet_kd batch-plans $id --batch-size "$batch" > /dev/null; done
fi
[ -f "$nnUNet_preprocessed/$stage2/$students.json" ] || nnunet_kd student-plans 522 -c 3d_fullres -p "$plans" --width "$width"

# train RESULTS DATASET TRAINER PLANS [VAR=VALUE ...]: fold 0 into the nnUNet_results RESULTS, skipped when finished,
# continued (--c) when interrupted
train() {
  local results=$1 dataset=$2 trainer=$3 plans=$4 name=${2%%_*}
  shift 4
  local folder=$results/$dataset/${trainer}__${plans}__3d_fullres/fold_0 resume=()
  local tag=""
  [ "$results" = "$nnUNet_results" ] || tag=_$(basename "$(dirname "$results")")
  local log=$work/logs/${name}_$trainer$tag.log
  if [ -f "$folder/checkpoint_final.pth" ]; then step "$dataset $trainer in $results: trained"; return; fi
  [ -f "$folder/checkpoint_latest.pth" ] && resume=(--c)
  step "training $dataset $trainer ($plans) into $results (log: $log)"
  env nnUNet_results="$results" "$@" nnUNetv2_train "${name#Dataset}" 3d_fullres 0 -tr "$trainer" -p "$plans" \
    -device "$device" "${resume[@]}" > "$log" 2>&1
}
model() { echo "${4:-$nnUNet_results}/$1/$2__$3__3d_fullres"; }
# seed 0's students sit next to the teacher; each other seed's in a results folder of its own
seed_results() { if [ "$1" = 0 ]; then echo "$nnUNet_results"; else echo "$work/seeds/seed_$1/results"; fi; }
# stage 2 with the spine's trainers: nnU-Net's mirroring except head-feet (trainers/nnUNetTrainerSpineStage2.py)
teacher=nnUNetTrainer_$schedule stage2_teacher=nnUNetTrainerSpineStage2_$schedule
train "$nnUNet_results" $stage1 "$teacher" "$plans"
train "$nnUNet_results" $stage2 "$stage2_teacher" "$plans"
for seed in $seeds; do
  train "$(seed_results "$seed")" $stage2 "nnUNetTrainerSpineStage2Student_$schedule" "$students" \
    nnUNet_KD_seed="$seed"
  train "$(seed_results "$seed")" $stage2 "nnUNetTrainerSpineStage2KDLogits_$schedule" "$students" \
    nnUNet_KD_seed="$seed" nnUNet_KD_teacher="$(model $stage2 "$stage2_teacher" "$plans")"
done
[ "${ONE_SHOT:-1}" = 1 ] && train "$nnUNet_results" $one_shot "$teacher" "$plans"

# predictions of the held-out scans, each command timed as a whole (model loading included); a folder that holds
# its wall_seconds is finished and kept
declare -A stage2_models=(["stage-2 teacher"]=$(model $stage2 "$stage2_teacher" "$plans"))
stage2_runs=("stage-2 teacher")
for seed in $seeds; do
  suffix=$([ "$seed" = 0 ] || echo " seed $seed")
  stage2_models["stage-2 student alone$suffix"]=$(model $stage2 "nnUNetTrainerSpineStage2Student_$schedule" \
    "$students" "$(seed_results "$seed")")
  stage2_models["stage-2 KD student$suffix"]=$(model $stage2 "nnUNetTrainerSpineStage2KDLogits_$schedule" \
    "$students" "$(seed_results "$seed")")
  stage2_runs+=("stage-2 student alone$suffix" "stage-2 KD student$suffix")
done
runs=() seconds=()
# timed NAME OUTPUT_FOLDER COMMAND...: run the prediction command unless finished; add the run to the table
timed() {
  local name=$1 out=$2 log=$work/logs/$(basename "$(dirname "$2")")_$(basename "$2").log
  shift 2
  if [ ! -f "$out/wall_seconds" ]; then
    step "predicting: $name (log: $log)"
    local start=$SECONDS
    "$@" > "$log" 2>&1
    echo $((SECONDS - start)) > "$out/wall_seconds"
  fi
  runs+=("$name=$out") seconds+=("$name=$(cat "$out/wall_seconds")")
}
for run in "${stage2_runs[@]}"; do
  timed "two-stage, $run" "$work/predicted/${run// /_}" nnunet_kd spine predict -i "$work/scans_test" \
    -o "$work/predicted/${run// /_}" --stage1 "$(model $stage1 "$teacher" "$plans")" --stage2 "${stage2_models[$run]}" \
    -device "$device" "${tta[@]}"
done
if [ "${ONE_SHOT:-1}" = 1 ]; then
  mkdir -p "$work/one_shot_input"
  for ct in "$work"/scans_test/*_ct.nii.gz; do
    ln -sf "$ct" "$work/one_shot_input/$(basename "$ct" _ct.nii.gz)_0000.nii.gz"
  done
  timed "one-shot multi-label nnU-Net" "$work/predicted/one_shot" nnUNetv2_predict -i "$work/one_shot_input" \
    -o "$work/predicted/one_shot" -d 523 -c 3d_fullres -f 0 -tr "$teacher" -p "$plans" -device "$device" \
    "${tta[@]}" -npp 1 -nps 1
fi

step "scores on the $test_scans held-out scans"
nnunet_kd spine table "$work/scans_test" "${runs[@]}" --seconds "${seconds[@]}" --json "$work/spine_table.json" \
  | tee "$work/spine_table.md"
nnunet_kd report 522 | tee "$work/stage2_models.md"

if [ -n "${REAL:-}" ]; then
  step "the same models on the real scans in $REAL"
  runs=() seconds=()
  for run in "${stage2_runs[@]}"; do
    timed "two-stage, $run" "$work/predicted_real/${run// /_}" nnunet_kd spine predict -i "$REAL" \
      -o "$work/predicted_real/${run// /_}" --stage1 "$(model $stage1 "$teacher" "$plans")" \
      --stage2 "${stage2_models[$run]}" -device "$device" "${tta[@]}"
  done
  nnunet_kd spine table "$REAL" "${runs[@]}" --seconds "${seconds[@]}" --json "$work/spine_table_real.json" \
    | tee "$work/spine_table_real.md"
fi
