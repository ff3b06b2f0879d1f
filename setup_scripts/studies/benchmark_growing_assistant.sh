#!/usr/bin/env bash
# Growing teacher-assistant benchmark on the generated dataset: a ~2 % parameter student alone, with
# nnUNetTrainerKDLogits and with nnUNetTrainerKDGrowingAssistant, same schedule, same seed(s), then held-out Dice and
# the cost of a training step relative to nnUNetTrainerKDLogits.
#
# Usage: bash setup_scripts/studies/benchmark_growing_assistant.sh [SCHEDULE] [DEVICE] [WORKDIR]
#   SCHEDULE demo (6 epochs x 20 iterations, default), debug, or 5epochs ... 250epochs
#   DEVICE   cpu (default) or cuda
#   WORKDIR  default bench_growing_assistant
#   SEEDS    environment variable: nnUNet_KD_seed values, one training of each student per seed (default "0")
#   WIDTH    environment variable: student width (default 0.14: about 2 % of the teacher's parameters)
# Re-running skips finished models.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
schedule=${1:-demo}
device=${2:-cpu}
work=$(mkdir -p "${3:-bench_growing_assistant}" && cd "${3:-bench_growing_assistant}" && pwd)
seeds=${SEEDS:-0}
width=${WIDTH:-0.14}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
id=900 dataset=Dataset900_KDSynthetic cfg=3d_fullres
student=nnUNetPlans_KDStudent_w$width
teacher=nnUNetTrainer_${schedule}
mkdir -p "$work/logs" "$work/predictions"
step() { echo "[$(date +%H:%M:%S)] $*"; }

[ -f "$nnUNet_raw/$dataset/dataset.json" ] || \
  nnunet_kd generate-dataset --raw "$nnUNet_raw" --dataset-id $id --num-training 40 --num-test 10 --shape 32 40 40
[ -f "$nnUNet_preprocessed/$dataset/nnUNetPlans.json" ] || \
  nnUNetv2_plan_and_preprocess -d $id -c $cfg -np 2 > "$work/logs/plan.log" 2>&1
nnunet_kd student-plans $id -c $cfg --width "$width"

train() {  # results-folder trainer plans [environment...]
  local results=$1 trainer=$2 plans=$3; shift 3
  local fold=$results/$dataset/${trainer}__${plans}__${cfg}/fold_0 resume=()
  if [ -f "$fold/checkpoint_final.pth" ]; then step "$trainer -p $plans: done"; return; fi
  [ -f "$fold/checkpoint_latest.pth" ] && resume=(--c)
  step "$trainer -p $plans ${resume[*]} ($results)"
  env nnUNet_results="$results" "$@" nnUNetv2_train $id $cfg 0 -tr "$trainer" -p "$plans" -device "$device" \
    "${resume[@]}" > "$work/logs/$(basename "$results")_${trainer}.log" 2>&1 \
    || { tail -20 "$work/logs/$(basename "$results")_${trainer}.log"; exit 1; }
}
heldout_dice() {  # results-folder trainer plans -> prints "organ lesion vessel mean"
  local results=$1 trainer=$2 plans=$3 out=$work/predictions/$(basename "$1")_$2
  [ -f "$out/summary.json" ] || {
    nnUNet_results="$results" nnUNetv2_predict -i "$nnUNet_raw/$dataset/imagesTs" -o "$out" -d $id -c $cfg -f 0 \
      -tr "$trainer" -p "$plans" -device "$device" -npp 1 -nps 1 > "$work/logs/predict_$(basename "$out").log" 2>&1
    nnUNetv2_evaluate_simple "$nnUNet_raw/$dataset/labelsTs" "$out" -l 1 2 3 -np 2 > /dev/null
  }
  python -c "import json,sys; s=json.load(open(sys.argv[1])); m=s['mean']
print(' '.join(f\"{m[k]['Dice']:.3f}\" for k in ('1','2','3')), f\"{s['foreground_mean']['Dice']:.3f}\")" "$out/summary.json"
}

train "$nnUNet_results" "$teacher" nnUNetPlans
table=$work/growing_assistant_$schedule.md
{
  echo "| seed | model | trainer | organ | lesion | vessel | mean |"
  echo "|---|---|---|---|---|---|---|"
  echo "| - | teacher | $teacher | $(heldout_dice "$nnUNet_results" "$teacher" nnUNetPlans | tr ' ' '|' | sed 's/|/ | /g') |"
} > "$table"
for seed in $seeds; do
  results=$work/results_seed$seed  # one results folder per seed: the same trainer names, other runs
  mkdir -p "$results/$dataset"
  ln -sfn "$nnUNet_results/$dataset/${teacher}__nnUNetPlans__${cfg}" "$results/$dataset/${teacher}__nnUNetPlans__${cfg}"
  for trainer in nnUNetTrainerStudent nnUNetTrainerKDLogits nnUNetTrainerKDGrowingAssistant; do
    train "$results" "${trainer}_${schedule}" "$student" nnUNet_KD_seed="$seed" \
      nnUNet_KD_teacher="${teacher}__nnUNetPlans__${cfg}"
    echo "| $seed | w$width student | ${trainer}_${schedule} | $(heldout_dice "$results" "${trainer}_${schedule}" "$student" \
      | sed 's/ / | /g') |" >> "$table"
  done
done
step "held-out Dice (10 cases; nnUNetv2_predict fold 0, nnUNetv2_evaluate_simple):"
cat "$table"
step "training-step cost"
nnunet_kd bench step $id -p "$student" --teacher "$nnUNet_results/$dataset/${teacher}__nnUNetPlans__${cfg}" \
  --device "$device" --trainers nnUNetTrainerStudent nnUNetTrainerKDLogits nnUNetTrainerKDGrowingAssistant \
  --json "$work/step_$device.json" | tee "$work/step_$device.txt"
for seed in $seeds; do  # validation Dice, parameters, FLOPs and CPU time of every model of the seed
  nnUNet_results=$work/results_seed$seed nnunet_kd report $id --device cpu --time-cases 2 \
    -o "$work/report_seed$seed.md" > /dev/null
done
