#!/usr/bin/env bash
# How fast `nnunet_kd teacher-targets` stores a teacher's outputs: nnU-Net's tile-by-tile loop (--tile-batch 1)
# against tiles in batches (the default) and against the teacher exported and run by OpenVINO (--runtime openvino),
# whole calls interleaved, on one part of MSD Hippocampus 2d; after each, the same command once every case is stored
# (what a call costs besides its cases); then each set of targets compared with the first variant's.
#
# Usage: bash setup_scripts/studies/benchmark_teacher_targets.sh WORKDIR [OUT]
#   WORKDIR  the folder of setup_scripts/studies/study_hippocampus.sh (raw, preprocessed, results with its teacher)
#   OUT      timings and the comparison (default: benchmark_teacher_targets)
# Environment: TEACHER [nnUNetTrainer_40x50__nnUNetPlans_bs32__2d], REPEATS [2], PARTS [5] (-num_parts; part 0 of 5
# is 44 of the 260 cases), VARIANTS ["--tile-batch 1;default;--runtime openvino"]: teacher-targets flags, ';' between
# variants. Run it on an otherwise idle machine. Time on 2 cores: about 2.5 min per repeat.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -z "${VIRTUAL_ENV:-}" ] && [ -x "$repo/.venv/bin/nnunet_kd" ] && export PATH="$repo/.venv/bin:$PATH"
work=$(cd "${1:?give the study_hippocampus.sh folder}" && pwd)
out=$(mkdir -p "${2:-benchmark_teacher_targets}" && cd "${2:-benchmark_teacher_targets}" && pwd)
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_extTrainer=${nnUNet_extTrainer:-$repo/trainers}
teacher=${TEACHER:-nnUNetTrainer_40x50__nnUNetPlans_bs32__2d} parts=${PARTS:-5}
targets=$nnUNet_preprocessed/Dataset004_Hippocampus/kd_targets
timings=$out/calls.tsv

call() {  # call(name, flags...): one teacher-targets command, its wall seconds on stdout
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  nnunet_kd teacher-targets 4 -c 2d -p nnUNetPlans_bs32 --teacher "$teacher" -f 0 -device cpu -num_parts "$parts" \
    -part_id 0 "$@" --name "$name" >> "$out/$name.log" 2>&1
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}

IFS=';' read -r -a variants <<< "${VARIANTS:---tile-batch 1;default;--runtime openvino}"
printf "variant\trepeat\tcall_seconds\tstartup_seconds\n" > "$timings"
for repeat in $(seq "${REPEATS:-2}"); do
  for variant in "${variants[@]}"; do
    flags=()
    [ "$variant" = default ] || read -r -a flags <<< "$variant"
    label=$(echo "$variant" | sed 's/--//g; s/[^A-Za-z0-9]\+/_/g; s/^_//; s/_$//') && name=benchmark_${label}_r$repeat
    rm -rf "${targets:?}/$name" "$out/$name.log"
    seconds=$(call "$name" "${flags[@]}")
    startup=$(call "$name" "${flags[@]}")  # every case stored: imports, loading the teacher, checking the cases
    printf "%s\t%s\t%s\t%s\n" "$label" "$repeat" "$seconds" "$startup" | tee -a "$timings"
  done
done

python - "$targets" "$timings" <<'EOF' | tee "$out/summary.txt"
import csv, statistics, sys
from pathlib import Path

import blosc2
import numpy as np

targets, rows = Path(sys.argv[1]), list(csv.DictReader(open(sys.argv[2]), delimiter="\t"))
cases = len(list((targets / f"benchmark_{rows[0]['variant']}_r1").glob("*.b2nd")))
per_case = {}
for row in rows:
    per_case.setdefault(row["variant"], []).append((float(row["call_seconds"]) - float(row["startup_seconds"])) / cases)
for variant, values in per_case.items():
    startups = [float(r["startup_seconds"]) for r in rows if r["variant"] == variant]
    print(f"{variant}: {statistics.median(values):.3f} s per case (median of {len(values)}: "
          f"{', '.join(f'{v:.3f}' for v in values)}; {cases} cases), start-up {statistics.median(startups):.1f} s")
first, *others = per_case
for other in others:
    reference, candidate = targets / f"benchmark_{first}_r1", targets / f"benchmark_{other}_r1"
    worst = differing = voxels = 0
    for file in sorted(reference.glob("*.b2nd")):
        a, b = (blosc2.open(str(folder / file.name))[:].astype(np.float32) for folder in (reference, candidate))
        worst, differing, voxels = (max(worst, float(np.abs(a - b).max())),
                                    differing + int((a.argmax(0) != b.argmax(0)).sum()), voxels + a[0].size)
    print(f"{other} against {first}: {statistics.median(per_case[first]) / statistics.median(per_case[other]):.2f}x "
          f"per case; stored log-probabilities differ by {worst:.3g} at most, the most probable class in {differing} "
          f"of {voxels} voxels")
EOF
