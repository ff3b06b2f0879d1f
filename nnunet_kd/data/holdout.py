"""A labelled test set no model has seen: a copy of a raw dataset with some labelled cases moved to imagesTs/labelsTs.

nnU-Net's cross-validation uses every labelled case of `imagesTr`, so once all five folds are trained (the 5-fold
ensemble), every case has been training data for four of them. Comparing students distilled from the ensemble with
students distilled from one fold is only fair on cases outside all five folds; MSD's own `imagesTs` have no labels.

Where several cases belong to one patient (ACDC: `patient001_frame01` and `patient001_frame12`, the two cardiac
phases of one heart), a `group_pattern` keeps each patient on one side: of the test set, and of every fold
(`grouped_splits`, written as nnU-Net's `splits_final.json`, as nnU-Net's own ACDC conversion splits by patient).
Otherwise the other phase of a test patient would be training data, and validation would score a heart the network
has seen.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from nnunet_kd.core.settings import KDConfigurationError


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link where the file system allows it (no second copy of large images), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def labelled_cases(raw_dataset: str | Path) -> list[str]:
    """Identifiers of the cases in `labelsTr` that have every image channel in `imagesTr`."""
    raw_dataset = Path(raw_dataset)
    dataset_json = json.loads((raw_dataset / "dataset.json").read_text())
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    cases = sorted(path.name[:-len(ending)] for path in (raw_dataset / "labelsTr").glob(f"*{ending}"))
    incomplete = [case for case in cases
                  if not all((raw_dataset / "imagesTr" / f"{case}_{c:04d}{ending}").is_file() for c in range(channels))]
    if incomplete:
        raise KDConfigurationError(f"{raw_dataset}: cases {incomplete[:5]} have a label but not all {channels} image "
                                   f"channels in imagesTr (<case>_0000{ending} ...).")
    return cases


def case_groups(cases: list[str], group_pattern: str | None) -> dict[str, str]:
    """Each case's group: the first capture group of `group_pattern` (a regular expression matched at the start of the
    case identifier, e.g. `(patient\\d+)_`), or the case itself without a pattern."""
    if group_pattern is None:
        return {case: case for case in cases}
    pattern = re.compile(group_pattern)
    if pattern.groups < 1:
        raise KDConfigurationError(f"--group-pattern {group_pattern!r} has no capture group: put the part that names "
                                   f"the patient in parentheses, e.g. '(patient\\d+)_'.")
    matches = {case: pattern.match(case) for case in cases}
    unmatched = [case for case, match in matches.items() if match is None]
    if unmatched:
        raise KDConfigurationError(f"--group-pattern {group_pattern!r} does not match cases {unmatched[:5]} (matched "
                                   f"at the start of the case name): every case needs a group.")
    return {case: match.group(1) for case, match in matches.items()}


def grouped_splits(cases: list[str], group_pattern: str | None, num_folds: int = 5, seed: int = 12345) -> list[dict]:
    """nnU-Net's `splits_final.json` content: `num_folds` folds whose validation cases are whole groups, the groups
    shuffled with `seed` and dealt to the folds in turn."""
    groups = case_groups(cases, group_pattern)
    names = sorted(set(groups.values()))
    if len(names) < num_folds:
        raise KDConfigurationError(f"{len(names)} groups cannot make {num_folds} folds.")
    order = np.random.default_rng(seed).permutation(len(names))
    splits = []
    for fold in range(num_folds):
        validation = {names[i] for i in order[fold::num_folds]}
        splits.append({"train": sorted(c for c in cases if groups[c] not in validation),
                       "val": sorted(c for c in cases if groups[c] in validation)})
    return splits


def write_grouped_splits(preprocessed_dataset_folder: str | Path, cases: list[str], group_pattern: str,
                         num_folds: int = 5) -> Path:
    """Write `grouped_splits` as `splits_final.json`, which nnU-Net then uses instead of its own split by case. An
    existing file is kept if it is the same, else refused: folds trained on it would change meaning."""
    path = Path(preprocessed_dataset_folder) / "splits_final.json"
    splits = grouped_splits(cases, group_pattern, num_folds)
    if path.is_file():
        if json.loads(path.read_text()) != splits:
            raise KDConfigurationError(f"{path} exists with other folds (nnU-Net writes one by case at the first "
                                       f"training). Folds trained on it would change meaning: remove it only if no "
                                       f"fold has been trained, then run this again.")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=2))
    return path


def write_holdout_dataset(source: str | Path, destination: str | Path, num_test_cases: int, seed: int = 0,
                          group_pattern: str | None = None) -> dict:
    """Copy `source` to `destination`, drawing `num_test_cases` labelled cases (seeded) into imagesTs/labelsTs.

    With `group_pattern` (`case_groups`) whole groups are drawn until at least `num_test_cases` cases are held out.
    The rest stay in imagesTr/labelsTr, where nnU-Net plans, splits and trains on them. The source's own unlabelled
    imagesTs are not copied. dataset.json gains `numTraining` to match and `held_out_test_cases`. Returns
    {"training": [...], "test": [...]}.
    """
    source, destination = Path(source), Path(destination)
    dataset_json = json.loads((source / "dataset.json").read_text())
    cases = labelled_cases(source)
    if not 1 <= num_test_cases < len(cases):
        raise KDConfigurationError(f"--test-cases {num_test_cases}: {source.name} has {len(cases)} labelled cases; "
                                   f"hold out at least 1 and leave some to train on.")
    same_id = sorted(destination.parent.glob(f"{destination.name.split('_')[0]}_*"))
    if destination.exists() or same_id:
        raise KDConfigurationError(f"{(same_id or [destination])[0]} exists: choose another dataset id (nnU-Net "
                                   f"needs one folder per id) or remove it first.")
    drawn: list[str] = []
    if group_pattern is None:  # the draw every held-out dataset so far was made with
        test = sorted(np.random.default_rng(seed).choice(cases, num_test_cases, replace=False).tolist())
    else:
        groups = case_groups(cases, group_pattern)
        sizes = Counter(groups.values())
        names = sorted(sizes)
        for index in np.random.default_rng(seed).permutation(len(names)):
            if sum(sizes[name] for name in drawn) >= num_test_cases:
                break
            drawn.append(names[index])
        test = sorted(c for c in cases if groups[c] in drawn)
        if len(test) == len(cases):
            raise KDConfigurationError(f"--test-cases {num_test_cases} in whole groups leaves no case to train on.")
    training = [case for case in cases if case not in set(test)]
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    for split, images, labels in ((training, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
        (destination / images).mkdir(parents=True)
        (destination / labels).mkdir()
        for case in split:
            for c in range(channels):
                name = f"{case}_{c:04d}{ending}"
                _link_or_copy(source / "imagesTr" / name, destination / images / name)
            _link_or_copy(source / "labelsTr" / f"{case}{ending}", destination / labels / f"{case}{ending}")
    held_out = {**dataset_json, "numTraining": len(training), "held_out_test_cases": test,
                **({"held_out_groups": sorted(drawn), "group_pattern": group_pattern} if group_pattern else {}),
                "description": f"{source.name} without {len(test)} labelled test cases (imagesTs/labelsTs, "
                               f"drawn with seed {seed}{' in whole groups' if group_pattern else ''})"}
    (destination / "dataset.json").write_text(json.dumps(held_out, indent=2))
    return {"training": training, "test": test}
