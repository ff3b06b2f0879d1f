#!/usr/bin/env bash
# Real-data benchmark: teacher, plain student and every KD trainer with one short schedule, then the report.
#
# Usage: bash setup_scripts/studies/benchmark_real_data.sh SOURCE [SCHEDULE] [DEVICE] [WORKDIR]
#   SOURCE   an MSD task folder (e.g. Task04_Hippocampus from the Medical Segmentation Decathlon; converted with nnUNetv2_convert_MSD_dataset)
#            or an nnU-Net raw dataset folder (DatasetXXX_Name with dataset.json)
#   SCHEDULE 5epochs, 10epochs, 20epochs, 50epochs, 100epochs, 250epochs (nnU-Net's nnUNetTrainer_<N>epochs and
#            our KD counterparts), or demo / debug (short CPU schedules); see trainers/nnUNetTrainer_schedules.py
#            (default 10epochs)
#   DEVICE   cuda or cpu (default cuda)
#   WORKDIR  nnU-Net folders and the report (default bench_<dataset>)
# Re-running continues where it stopped: finished models are skipped, interrupted ones resume with --c.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# the environment setup_scripts/install.sh made, unless another one is active
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give an MSD task folder or an nnU-Net raw dataset folder}" && pwd)
schedule=${2:-10epochs}
device=${3:-cuda}
case " 5epochs 10epochs 20epochs 50epochs 100epochs 250epochs demo debug " in
  *" $schedule "*) ;;
  *) echo "SCHEDULE must be one of 5epochs 10epochs 20epochs 50epochs 100epochs 250epochs demo debug" >&2; exit 2;;
esac

name=$(basename "$source_dir")
if [[ $name =~ ^Task([0-9]+)_(.*)$ ]]; then
  id=$((10#${BASH_REMATCH[1]})); dataset=$(printf "Dataset%03d_%s" "$id" "${BASH_REMATCH[2]}")
elif [[ $name =~ ^Dataset([0-9]{3})_ ]]; then
  id=$((10#${BASH_REMATCH[1]})); dataset=$name
else
  echo "cannot tell the dataset id from $name (expected TaskXX_Name or DatasetXXX_Name)" >&2; exit 2
fi
work=$(mkdir -p "${4:-bench_$dataset}" && cd "${4:-bench_$dataset}" && pwd)
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
mkdir -p "$work/logs"
cfg=3d_fullres
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "preparing $name (conversion or link, planning and preprocessing, student plans)"
nnunet_kd prepare "$source_dir" -c $cfg --widths 0.25 > "$work/logs/prepare.log"
student=nnUNetPlans_KDStudent_w0.25
teacher=nnUNetTrainer_${schedule}

train() {  # trainer plans [environment...]
  local trainer=$1 plans=$2; shift 2
  local fold_dir=$nnUNet_results/$dataset/${trainer}__${plans}__${cfg}/fold_0 resume=()
  if [ -f "$fold_dir/checkpoint_final.pth" ]; then step "$trainer -p $plans: done, skipping"; return; fi
  [ -f "$fold_dir/checkpoint_latest.pth" ] && resume=(--c)
  step "$trainer -p $plans ${resume[*]}"
  env "$@" nnUNetv2_train "$id" $cfg 0 -tr "$trainer" -p "$plans" -device "$device" "${resume[@]}" \
    > "$work/logs/${trainer}__${plans}.log" 2>&1 || { tail -20 "$work/logs/${trainer}__${plans}.log"; exit 1; }
  grep -h "Mean Validation Dice" "$work/logs/${trainer}__${plans}.log" || true
}

train "$teacher" nnUNetPlans
train "nnUNetTrainerStudent_${schedule}" "$student"
# every KD trainer with a frozen teacher (nnUNetTrainerKDBarlowTwins needs a multi-modal dataset and trains its own)
for kd in KDLogits KDLogitMatching KDClassAffinity KDMultiScale KDGrowingAssistant; do
  train "nnUNetTrainer${kd}_${schedule}" "$student" nnUNet_KD_teacher="${teacher}__nnUNetPlans__${cfg}"
done
step "report"
nnunet_kd report "$id" --device cpu --time-cases 3 -o "$work/report_$dataset.md"
