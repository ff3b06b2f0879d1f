#!/usr/bin/env bash
# Issue #28's robustness rows: the models of benchmark_spine.sh on its test scans stored another way. `flipped`: each
# scan stored feet-first and mirrored left-right (the same body; DICOM orientation RPI instead of LPS); `blob`: a
# 12 mm cube of bone (+700 HU) beside the top of the spine, with the reference masks unchanged. Each table is scored
# like the plain one, so a robust pipeline gives the same rows.
#
# Usage: bash setup_scripts/studies/spine_robustness.sh WORKDIR   (the WORKDIR of a finished benchmark_spine.sh run)
# Environment: as benchmark_spine.sh (SCHEDULE [20x50], BATCH [2], WIDTH [0.25]); DEVICE [cpu].
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
work=$(cd "$1" && pwd)
schedule=${SCHEDULE:-20x50} batch=${BATCH-2} width=${WIDTH:-0.25} device=${DEVICE:-cpu}
plans=nnUNetPlans${batch:+_bs$batch}
students=${plans}_KDStudent_w$width
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
stage1=$nnUNet_results/Dataset521_SpineLocation/nnUNetTrainer_${schedule}__${plans}__3d_fullres
stage2=$nnUNet_results/Dataset522_SpineVertebrae

python - "$work" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

work = Path(sys.argv[1])
for variant in ("flipped", "blob"):
    (work / f"scans_{variant}").mkdir(exist_ok=True)
for ct_path in sorted((work / "scans_test").glob("*_ct.nii.gz")):
    mask_path = ct_path.with_name(ct_path.name.replace("_ct.nii.gz", "_seg-vert_msk.nii.gz"))
    ct, mask = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(mask_path))
    for image, path in ((ct, ct_path), (mask, mask_path)):
        sitk.WriteImage(sitk.DICOMOrient(image, "RPI"), str(work / "scans_flipped" / path.name))
    array, labels = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(mask)
    z, y, x = np.nonzero(labels)
    side = round(12 / ct.GetSpacing()[0])
    top = min(z.max() - side // 2, array.shape[0] - side)  # the generated scans are stored head up (LPS)
    left = min(int(x.max()) + side, array.shape[2] - side)  # beside the spine, clear of it
    array[top:top + side, int(y.mean()) - side // 2:int(y.mean()) + side // 2 + 1, left:left + side] = 700
    blob = sitk.GetImageFromArray(array)
    blob.CopyInformation(ct)
    sitk.WriteImage(blob, str(work / "scans_blob" / ct_path.name))
    sitk.WriteImage(mask, str(work / "scans_blob" / mask_path.name))
EOF

for variant in plain flipped blob; do
  scans=$work/scans_test
  [ "$variant" = plain ] || scans=$work/scans_$variant
  runs=()
  mkdir -p "$work/robustness/$variant"
  for run in "teacher:nnUNetTrainerSpineStage2_${schedule}__${plans}" \
             "KD student:nnUNetTrainerSpineStage2KDLogits_${schedule}__${students}"; do
    name=${run%%:*} out=$work/robustness/$variant/${name// /_}
    [ -d "$out" ] || nnunet_kd spine predict -i "$scans" -o "$out" --stage1 "$stage1" \
      --stage2 "$stage2/${run#*:}__3d_fullres" -device "$device" --disable_tta > "$out.log" 2>&1 || \
      { echo "prediction failed, see $out.log"; exit 1; }
    runs+=("two-stage, stage-2 $name, $variant=$out")
  done
  nnunet_kd spine table "$scans" "${runs[@]}" --json "$work/robustness/$variant.json" | tee "$work/robustness/$variant.md"
done
