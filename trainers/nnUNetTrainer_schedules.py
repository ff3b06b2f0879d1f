"""Schedule variants of the stock trainer and of every trainer of this folder, in the spirit of nnU-Net's
nnUNetTrainer_Xepochs.

Named `<trainer>_<schedule>`, e.g. `nnUNetTrainerKDLogits_debug`, `nnUNetTrainer_demo`,
`nnUNetTrainerKDMultiScale_20epochs`:
- `debug`: 2 epochs of 3 iterations (2 validation iterations, a checkpoint every epoch); runs every hook nnU-Net
  calls (epoch start/end, validation, checkpointing, final validation) in seconds on a CPU. The tests use it.
- `demo`: 6 epochs of 20 iterations, the schedule of `nnunet_kd demo` on a 2-core CPU.
- `<N>epochs` for N in 5, 10, 20, 50, 100, 250: nnU-Net's default epoch of 250 iterations. nnU-Net ships these
  for nnUNetTrainer; here they exist for nnUNetTrainerStudent and the KD trainers too, so a benchmark trains every
  model alike.
- `<E>x<I>`: E epochs of I iterations (10 validation iterations): short CPU schedules for real data, e.g.
  `nnUNetTrainer_40x50`, the teacher of setup_scripts/studies/study_hippocampus.sh.

Any other length, for this package's trainers only: `nnUNet_KD_num_epochs` and `nnUNet_KD_iterations_per_epoch`
(see nnunet_kd.core.schedule); `nnunet_kd study --epochs E --iterations I` uses them.
"""
import importlib
import inspect
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.core.schedule import SCHEDULES


def trainers_here(folder: Path = Path(__file__).parent) -> list[type]:
    """Every trainer defined in a module of this folder (the plain student, the KD methods and their variants, the
    spine's stage-2 trainers): a new method is its loss and a trainer file here, and gets its schedule variants
    without a list to edit."""
    found = []
    for path in sorted(folder.glob("nnUNetTrainer*.py")):
        if path.stem == Path(__file__).stem:
            continue
        module = importlib.import_module(path.stem)  # nnU-Net puts this folder on the path
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if cls.__module__ == module.__name__ and issubclass(cls, nnUNetTrainer)]
    return found


def with_schedule(base: type, schedule: str) -> type:
    attributes = SCHEDULES[schedule]

    # nnU-Net records __init__'s named arguments for checkpoints, so the signature must be spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in attributes.items():
            setattr(self, key, value)

    name = f"{base.__name__}_{schedule}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with the '{schedule}' schedule: {attributes}"})


for _base in (nnUNetTrainer, *trainers_here()):
    for _schedule in SCHEDULES:
        if _base is nnUNetTrainer and _schedule.endswith("epochs"):
            continue  # nnU-Net has its own nnUNetTrainer_<N>epochs
        _variant = with_schedule(_base, _schedule)
        globals()[_variant.__name__] = _variant
