#!/usr/bin/env bash
# The Hippocampus KD study in nnU-Net's 3d_fullres on one CUDA GPU, sized for about 10 minutes of an H100: the teacher
# (nnUNetTrainer_20x50: 1,000 iterations), then 3 seeds x (nnUNetTrainerStudent, nnUNetTrainerKDLogits) of a w0.25
# student, 1,000 iterations each, three runs at once while the GPU has room. nnU-Net's GPU defaults apply (autocast;
# torch.compile where nnU-Net enables it). The report records the device.
#
# Usage: bash setup_scripts/studies/study_hippocampus_gpu.sh MSD_FOLDER [WORKDIR]
# A CPU check of the same script: DEVICE=cpu TEACHER_SCHEDULE=debug EPOCHS=2 ITERATIONS=2 SEEDS="0 1" \
#   bash setup_scripts/studies/study_hippocampus_gpu.sh MSD_FOLDER /tmp/gpu_check
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ "${DEVICE:-cuda}" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CONFIG=3d_fullres DEVICE=${DEVICE:-cuda} TEACHER_SCHEDULE=${TEACHER_SCHEDULE:-20x50} EPOCHS=${EPOCHS:-20} \
  ITERATIONS=${ITERATIONS:-50} JOBS=${JOBS:-3} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-4} \
  exec bash "$repo/setup_scripts/studies/study_hippocampus.sh" "$@"
