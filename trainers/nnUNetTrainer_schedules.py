"""Schedule variants of the stock trainer and of every KD trainer, in the spirit of nnU-Net's nnUNetTrainer_Xepochs.

Named `<trainer>_<schedule>`, e.g. `nnUNetTrainerKDLogits_debug`, `nnUNetTrainer_demo`,
`nnUNetTrainerKDMultiScale_20epochs`:
- `debug`: 2 epochs of 3 iterations (2 validation iterations, a checkpoint every epoch); runs every hook nnU-Net
  calls (epoch start/end, validation, checkpointing, final validation) in seconds on a CPU. The tests use it.
- `demo`: 6 epochs of 20 iterations, the schedule of `nnunet_kd demo` on a 2-core CPU.
- `<N>epochs` for N in 5, 10, 20, 50, 100, 250: nnU-Net's default epoch of 250 iterations. nnU-Net ships these
  for nnUNetTrainer; here they exist for nnUNetTrainerStudent and the KD trainers too, so a benchmark trains every
  model alike.
"""
import torch
from nnUNetTrainerKDBarlowTwins import nnUNetTrainerKDBarlowTwins
from nnUNetTrainerKDClassAffinity import nnUNetTrainerKDClassAffinity
from nnUNetTrainerKDGrowingAssistant import nnUNetTrainerKDGrowingAssistant
from nnUNetTrainerKDLogitMatching import nnUNetTrainerKDLogitMatching
from nnUNetTrainerKDLogits import nnUNetTrainerKDLogits
from nnUNetTrainerKDMultiScale import nnUNetTrainerKDMultiScale
from nnUNetTrainerStudent import nnUNetTrainerStudent
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# schedule name -> attributes set after nnUNetTrainer.__init__
SCHEDULES = {
    "debug": {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2, "save_every": 1},
    "demo": {"num_epochs": 6, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 4},
    **{f"{n}epochs": {"num_epochs": n} for n in (5, 10, 20, 50, 100, 250)},
}
KD_TRAINERS = (nnUNetTrainerKDLogits, nnUNetTrainerKDLogitMatching, nnUNetTrainerKDClassAffinity,
               nnUNetTrainerKDMultiScale, nnUNetTrainerKDGrowingAssistant, nnUNetTrainerKDBarlowTwins)


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


for _base in (nnUNetTrainer, nnUNetTrainerStudent, *KD_TRAINERS):
    for _schedule in SCHEDULES:
        if _base is nnUNetTrainer and _schedule.endswith("epochs"):
            continue  # nnU-Net has its own nnUNetTrainer_<N>epochs
        _variant = with_schedule(_base, _schedule)
        globals()[_variant.__name__] = _variant
