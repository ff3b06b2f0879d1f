#!/usr/bin/env bash
# Real-data smoke check of the spine conversion (issue #13): the TPTBox project's CT crop with vertebra masks
# (Apache-2.0; L2-L4 at 1.5 mm, an oblique array orientation) renamed into the VerSe layout, converted into the three
# nnU-Net datasets, and each stage-2 patch listed with its memory and label size.
# Usage: bash setup_scripts/studies/spine_smoke_tptbox.sh SPINE_TPTBOX_SAMPLES_FOLDER [WORKDIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
source_dir=$(cd "${1:?give the Spine_TPTBox_samples folder}" && pwd)
work=$(mkdir -p "${2:-spine_smoke}" && cd "${2:-spine_smoke}" && pwd)
mkdir -p "$work/verse" "$work/raw" "$work/preprocessed"
cp "$source_dir/imagesTr/tpt_ct_0000.nii.gz" "$work/verse/tpt_ct.nii.gz"
cp "$source_dir/labelsTr/tpt_ct.nii.gz" "$work/verse/tpt_seg-vert_msk.nii.gz"
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed
rm -rf "$work"/raw/Dataset60[123]_*
nnunet_kd spine convert "$work/verse" --id 601 --stage2-spacing 1.5
python - "$work/verse" "$work/raw/Dataset602_SpineVertebrae" <<'PY'
import sys
from pathlib import Path

import SimpleITK as sitk

from nnunet_kd.spine.verse import find_cases, read_case, superior_axis, vertebrae_top_down

cases = find_cases(sys.argv[1])
ct, mask = read_case(cases[0])
axis, sign = superior_axis(ct)
print(f"{cases[0].name}: size {ct.GetSize()}, spacing {ct.GetSpacing()}, head-feet array axis {axis} ({sign:+d}); "
      f"vertebrae top down {vertebrae_top_down(sitk.GetArrayFromImage(mask), axis, sign)}")
for label in sorted(Path(sys.argv[2], "labelsTr").glob("*.nii.gz")):
    memory = label.parent.parent / "imagesTr" / label.name.replace(".nii.gz", "_0001.nii.gz")
    print(f"  {label.name:<22} label {int(sitk.GetArrayFromImage(sitk.ReadImage(str(label))).sum()):>6} voxels, "
          f"memory {int(sitk.GetArrayFromImage(sitk.ReadImage(str(memory))).sum()):>6} voxels")
PY
