"""A labelled test set no model has seen: a copy of a raw dataset with some labelled cases moved to imagesTs/labelsTs.

nnU-Net's cross-validation uses every labelled case of `imagesTr`, so once all five folds are trained (the 5-fold
ensemble), every case has been training data for four of them. Comparing students distilled from the ensemble with
students distilled from one fold is only fair on cases outside all five folds; MSD's own `imagesTs` have no labels.
"""
from __future__ import annotations

import json
import os
import shutil
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


def write_holdout_dataset(source: str | Path, destination: str | Path, num_test_cases: int, seed: int = 0) -> dict:
    """Copy `source` to `destination`, drawing `num_test_cases` labelled cases (seeded) into imagesTs/labelsTs.

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
    test = sorted(np.random.default_rng(seed).choice(cases, num_test_cases, replace=False).tolist())
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
                "description": f"{source.name} without {num_test_cases} labelled test cases (imagesTs/labelsTs, "
                               f"drawn with seed {seed})"}
    (destination / "dataset.json").write_text(json.dumps(held_out, indent=2))
    return {"training": training, "test": test}
