#!/usr/bin/env bash
# Every trainer on one device with nnU-Net's defaults there (on CUDA: autocast, torch.compile where nnU-Net enables
# it), a --c resume, stock nnUNetv2_predict of each student: one line per check, OK or FAIL with its log. Where two
# GPUs are present, also nnU-Net's DDP (-num_gpus 2) for the trainers that train more than the student or keep a frozen
# teacher beside it; with fewer GPUs that line says SKIP.
# Sized for a few minutes of one H100 (generated 3D data, `_debug` schedules); on a CPU it takes about 10 minutes.
#
# Usage: bash setup_scripts/gpu_check.sh [--device cuda|cpu] [WORKDIR]     (default: cuda, a new temporary folder)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
device=cuda
if [ "${1:-}" = --device ]; then device=$2; shift 2; fi
folder=${1:-$(mktemp -d)}
work=$(mkdir -p "$folder" && cd "$folder" && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=$repo/trainers nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
mkdir -p "$work/logs"
failures=0

check() {  # name, command...: one line per check
  local name=$1; shift
  local log="$work/logs/${name// /_}.log" start=$SECONDS
  if "$@" > "$log" 2>&1; then
    printf 'OK    %-58s %4ss\n' "$name" $((SECONDS - start))
  else
    printf 'FAIL  %-58s %4ss  (log: %s)\n' "$name" $((SECONDS - start)) "$log"; failures=$((failures + 1))
  fi
}
train() {  # dataset trainer plans [nnUNetv2_train options...]
  local dataset=$1 trainer=$2 plans=$3; shift 3
  nnUNetv2_train "$dataset" 3d_fullres 0 -tr "$trainer" -p "$plans" -device "$device" "$@"
}
predict() {  # dataset trainer plans images
  nnUNetv2_predict -i "$4" -o "$work/predictions/$2" -d "$1" -c 3d_fullres -f 0 -tr "$2" -p "$3" -device "$device" \
    -npp 1 -nps 1 --disable_progress_bar && ls "$work/predictions/$2"/*.nii.gz > /dev/null
}

echo "device: $device$( [ "$device" = cuda ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/ (/;s/$/)/')"
check "data: generated 1- and 4-channel datasets, planned" bash -c "
  nnunet_kd generate-dataset --dataset-id 950 --num-training 8 --num-test 2 --shape 32 48 48 &&
  nnunet_kd generate-dataset --multimodal --dataset-id 951 --num-training 8 --num-test 2 --shape 32 48 48 &&
  nnUNetv2_plan_and_preprocess -d 950 951 -c 3d_fullres -np 2 &&
  nnunet_kd student-plans 950 --width 0.25 && nnunet_kd student-plans 950 --arch lcovnet"
student=nnUNetPlans_KDStudent_w0.25 images=$nnUNet_raw/Dataset950_KDSynthetic/imagesTs
check "teacher: nnUNetTrainer_debug" train 950 nnUNetTrainer_debug nnUNetPlans
export nnUNet_KD_teacher=nnUNetTrainer_debug__nnUNetPlans__3d_fullres
for trainer in nnUNetTrainerStudent nnUNetTrainerKDLogits nnUNetTrainerKDLogitMatching nnUNetTrainerKDClassAffinity \
               nnUNetTrainerKDGrowingAssistant; do
  check "$trainer: train" train 950 "${trainer}_debug" $student
  check "$trainer: nnUNetv2_predict" predict 950 "${trainer}_debug" $student "$images"
done
check "nnUNetTrainerKDMultiScale (LCOV-Net): train" train 950 nnUNetTrainerKDMultiScale_debug \
  nnUNetPlans_KDStudent_lcovnet_w1
check "nnUNetTrainerKDMultiScale (LCOV-Net): nnUNetv2_predict" predict 950 nnUNetTrainerKDMultiScale_debug \
  nnUNetPlans_KDStudent_lcovnet_w1 "$images"
# --c: a run of one epoch continued to two with --c (length from the environment; fold 1, taught by the fold-0 teacher)
check "nnUNetTrainerKDLogits: 1 epoch, then --c to 2" bash -c "
  export nnUNet_KD_iterations_per_epoch=3 nnUNet_KD_val_iterations_per_epoch=2 nnUNet_KD_teacher_folds=0
  nnUNet_KD_num_epochs=1 nnUNetv2_train 950 3d_fullres 1 -tr nnUNetTrainerKDLogits -p $student -device $device &&
  nnUNet_KD_num_epochs=2 nnUNetv2_train 950 3d_fullres 1 -tr nnUNetTrainerKDLogits -p $student -device $device --c \
    | tee /dev/stderr | grep -q 'Epoch 1'"
check "nnUNetTrainerKDBarlowTwins (FLAIR,T1CE of 4): train" env nnUNet_KD_student_channels=FLAIR,T1CE \
  nnUNet_KD_teacher= bash -c "nnUNetv2_train 951 3d_fullres 0 -tr nnUNetTrainerKDBarlowTwins_debug -device $device"
check "nnUNetTrainerKDBarlowTwins: nnUNetv2_predict from 2 channels" bash -c "
  nnunet_kd subset-channels 951 --channels FLAIR,T1CE --dataset-id 952 &&
  nnUNetv2_predict -i \$nnUNet_raw/Dataset952_KDSyntheticMultiModal_FLAIRT1CE/imagesTs -o $work/predictions/bt \
    -d 951 -c 3d_fullres -f 0 -tr nnUNetTrainerKDBarlowTwins_debug -device $device -npp 1 -nps 1 \
    --disable_progress_bar && ls $work/predictions/bt/*.nii.gz"
# DDP on fold 1 (the fold-0 teacher), so that the single-device runs above stay as they are: the frozen teacher outside
# the wrapper, the growing master network and Barlow Twins' joint teacher and projector synchronised beside the student
gpus=$([ "$device" = cuda ] && python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 2 ]; then
  for trainer in nnUNetTrainerKDLogits nnUNetTrainerKDGrowingAssistant; do
    check "$trainer: train on 2 GPUs (DDP)" env nnUNet_KD_teacher_folds=0 \
      nnUNetv2_train 950 3d_fullres 1 -tr "${trainer}_debug" -p $student -num_gpus 2
  done
  check "nnUNetTrainerKDBarlowTwins: train on 2 GPUs (DDP)" env nnUNet_KD_student_channels=FLAIR,T1CE \
    nnUNet_KD_teacher= nnUNetv2_train 951 3d_fullres 1 -tr nnUNetTrainerKDBarlowTwins_debug -num_gpus 2
else
  printf 'SKIP  %-58s (%s GPU(s) on %s)\n' "training on 2 GPUs (DDP, -num_gpus 2)" "${gpus:-0}" "$device"
fi
echo "$failures failed; logs in $work/logs"
exit $((failures > 0))
