#!/usr/bin/env bash
# The student that lacks a modality, on real glioma MRI: TCGA lower-grade glioma (75 patients; T1, FLAIR, T1CE;
# label 1 = FLAIR abnormality), 2d on a CPU. A teacher on all three channels (stock nnU-Net), then students on
# T1 + T1CE (no FLAIR: the hard case) and on FLAIR alone (the easy one): plain (nnUNetTrainerStudent on the subset,
# i.e. nnU-Net on those channels), nnUNetTrainerKDBarlowTwins (Choi et al. 2023, single stage, its own jointly trained
# teacher) and nnUNetTrainerKDLogits from the frozen full-MRI teacher's stored targets. 20 patients are held out as a
# test set outside every fold; every student is paired by seed (same initial weights) with the plain student.
#
# Usage: bash setup_scripts/studies/study_lgg_modalities.sh SHARED_DATA_DIR [WORKDIR]
#   SHARED_DATA_DIR  the folder holding LGG_FLAIR/ (nnU-Net raw layout: imagesTr, labelsTr, dataset.json)
#   WORKDIR          nnU-Net folders, logs and the studies (default: study_lgg)
# Environment (defaults in brackets): STAGE [core]: core = the teacher and the T1+T1CE full-width students; all =
#   also FLAIR alone, w0.25 students of both subsets and one online KDLogits seed; SEEDS ["0 1 2 3 4"];
#   EPOCHS [40] x ITERATIONS [50] for the students; TEACHER_SCHEDULE [60x50]; BATCH [12]; DEVICE [cpu].
# Runs: core = the teacher, stored targets, T1+T1CE full width: plain / Barlow Twins / KDLogits x 5 seeds (15 student
#   runs); all = + FLAIR full width (15), w0.25 of both subsets (30), online KDLogits seed 0 (T1+T1CE, full width: 1).
# Timing (2026-12-07, 2-core Intel Xeon, the CPU check below, batch 12, full width): prepare 65 s; an epoch of 2
#   training and 10 validation iterations 12.5 s (plain student, 2 channels), 11.2 s (KDLogits, stored targets),
#   13.2 s (Barlow Twins, with its 3-channel teacher); the teacher's epoch of 3 training and 2 validation iterations
#   14.4 s: about 3-4.5 s per training iteration. Stored targets of the 55 training cases with mirroring 9 min;
#   validation plus the 20 test cases of one full-width model about 6 min. So a 40x50 run takes about 2-2.5 hours at
#   full width on 2 CPU cores, the teacher's 60x50 about 3.5, and the core about 35-45 hours: a GPU's work, or many
#   sessions (nnU-Net keeps checkpoint_latest every 50 epochs, so a stopped run loses up to 50 epochs).
# Every study gets `nnunet_kd study-lesions` beside its Dice report: false-positive volume on lesion-free slices, the
#   share of lesion-free slices with any, HD95 and missed lesions per case and run (lesions.md, per_case_lesions.csv).
# Re-running continues where it stopped; seeds run in turn, each in every study, so that what has finished is paired.
# A CPU check of the whole chain: SEEDS="0" TEACHER_SCHEDULE=debug EPOCHS=1 ITERATIONS=2 \
#   bash setup_scripts/studies/study_lgg_modalities.sh SHARED_DATA_DIR /tmp/lgg_check
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give the shared data folder that holds LGG_FLAIR/}" && pwd)/LGG_FLAIR
work=$(mkdir -p "${2:-study_lgg}" && cd "${2:-study_lgg}" && pwd)
stage=${STAGE:-core} seeds=${SEEDS:-0 1 2 3 4} epochs=${EPOCHS:-40} iterations=${ITERATIONS:-50}
batch=${BATCH:-12} device=${DEVICE:-cpu} teacher_trainer=nnUNetTrainer_${TEACHER_SCHEDULE:-60x50}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
id=621 dataset=Dataset621_LGG_FLAIRHoldout20 plans=nnUNetPlans_bs$batch
teacher=${teacher_trainer}__${plans}__2d
mkdir -p "$work/logs"
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "preparing $source_dir: 20 held-out patients, 2d, batch $batch, student width 0.25"
nnunet_kd prepare "$source_dir" --dataset-id 620 -c 2d --holdout 20 --holdout-id $id --batch-size "$batch" \
  --widths 0.25 > "$work/logs/prepare.log"

folder=$nnUNet_results/$dataset/$teacher/fold_0
if [ ! -f "$folder/validation/summary.json" ]; then
  resume=(); [ -f "$folder/checkpoint_latest.pth" ] && resume=(--c)
  step "teacher: $teacher_trainer -p $plans on T1, FLAIR, T1CE (log: $work/logs/teacher.log)"
  nnUNetv2_train $id 2d 0 -tr "$teacher_trainer" -p "$plans" -device "$device" "${resume[@]}" \
    >> "$work/logs/teacher.log" 2>&1
fi
grep -h "Mean Validation Dice" "$work/logs/teacher.log" | tail -1 || true  # the log may be gone, the model not

targets=${teacher}__f0
if [ ! -f "$nnUNet_preprocessed/$dataset/kd_targets/$targets/manifest.json" ]; then
  step "the teacher's stored targets (fold 0, mirroring as nnU-Net predicts, every channel)"
  nnunet_kd teacher-targets $id -c 2d -p "$plans" --teacher "$teacher" -f 0 -device "$device" \
    > "$work/logs/targets.log" 2>&1
fi

test_set=(--test-images "$nnUNet_raw/$dataset/imagesTs" --test-labels "$nnUNet_raw/$dataset/labelsTs")
study() {  # study(channels, student plans, folder, seeds, trainers and other options ...)
  # shellcheck disable=SC2086  # the seed list is meant to split
  nnunet_kd study $id -c 2d -p "$2" --teacher "$teacher" --student-channels "$1" --seeds $4 --epochs "$epochs" \
    --iterations "$iterations" --val-iterations 10 --device "$device" "${test_set[@]}" -o "$3" "${@:5}" \
    >> "$work/logs/$(basename "$3").log" 2>&1
}
students() {  # students(channels, student plans, name, seeds): plain + stored-target KDLogits, then Barlow Twins
  step "$3, seeds$4: plain and KDLogits from the stored targets"
  study "$1" "$2" "$work/study_${3}_kd" "$4" --trainers nnUNetTrainerStudent nnUNetTrainerKDLogits \
    --teacher-targets "$targets" --time-cases "$5"
  step "$3, seeds$4: Barlow Twins (the plain runs copied)"
  study "$1" "$2" "$work/study_${3}_bt" "$4" --trainers nnUNetTrainerStudent nnUNetTrainerKDBarlowTwins \
    --baseline-from "$work/study_${3}_kd" --time-cases "$5"
  for kind in kd bt; do  # what a glioma reader looks at beside Dice: FP volume on lesion-free slices, HD95
    nnunet_kd study-lesions "$work/study_${3}_$kind" --label 1 > "$work/logs/lesions_${3}_$kind.log"
  done
}

done_seeds=""
for seed in $seeds; do
  done_seeds="$done_seeds $seed" time_cases=0
  [ "$seed" = "${seeds##* }" ] && time_cases=3  # CPU timings once, in the last reports
  students T1,T1CE "$plans" t1t1ce_w1 "$done_seeds" $time_cases
  if [ "$stage" = all ]; then
    students FLAIR "$plans" flair_w1 "$done_seeds" $time_cases
    students T1,T1CE "${plans}_KDStudent_w0.25" t1t1ce_w0.25 "$done_seeds" $time_cases
    students FLAIR "${plans}_KDStudent_w0.25" flair_w0.25 "$done_seeds" $time_cases
  fi
done
if [ "$stage" = all ]; then
  step "online KDLogits, seed 0, against its stored-target twin"
  study T1,T1CE "$plans" "$work/study_t1t1ce_w1_online" 0 --trainers nnUNetTrainerStudent nnUNetTrainerKDLogits \
    --baseline-from "$work/study_t1t1ce_w1_kd" --time-cases 0
  nnunet_kd study-compare "$work/study_t1t1ce_w1_kd" "$work/study_t1t1ce_w1_online" \
    -o "$work/online_vs_stored.md"
fi
step DONE
for study_folder in "$work"/study_*; do
  [ -f "$study_folder/report.md" ] && { echo "== $study_folder"; cat "$study_folder/report.md"; }
  if [ -f "$study_folder/lesions.md" ]; then cat "$study_folder/lesions.md"; fi
done
