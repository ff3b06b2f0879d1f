"""Short-schedule variants, in the spirit of nnU-Net's own nnUNetTrainer_Xepochs.

`_debug`: 2 epochs of 3 iterations; runs every hook nnU-Net calls (epoch start/end, validation, checkpointing, final
validation) in seconds on a CPU. The test suite uses these.
`_demo`: the schedule of `nnunet_kd demo`, long enough on the generated dataset to separate teacher, student and
KD student, short enough for a 2-core CPU.
"""
import torch
from nnUNetTrainerKDClassAffinity import nnUNetTrainerKDClassAffinity
from nnUNetTrainerKDLogitMatching import nnUNetTrainerKDLogitMatching
from nnUNetTrainerKDLogits import nnUNetTrainerKDLogits
from nnUNetTrainerKDMultiScale import nnUNetTrainerKDMultiScale
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _Debug:
    # nnU-Net records __init__'s named arguments for checkpoints, so the signature must be spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1  # every epoch leaves a checkpoint_latest.pth to resume from


class _Demo:
    # nnU-Net records __init__'s named arguments for checkpoints, so the signature must be spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 6
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 4


class nnUNetTrainer_debug(_Debug, nnUNetTrainer):
    pass


class nnUNetTrainerKDLogits_debug(_Debug, nnUNetTrainerKDLogits):
    pass


class nnUNetTrainerKDLogitMatching_debug(_Debug, nnUNetTrainerKDLogitMatching):
    pass


class nnUNetTrainerKDClassAffinity_debug(_Debug, nnUNetTrainerKDClassAffinity):
    pass


class nnUNetTrainerKDMultiScale_debug(_Debug, nnUNetTrainerKDMultiScale):
    pass


class nnUNetTrainer_demo(_Demo, nnUNetTrainer):
    pass


class nnUNetTrainerKDLogits_demo(_Demo, nnUNetTrainerKDLogits):
    pass


class nnUNetTrainerKDMultiScale_demo(_Demo, nnUNetTrainerKDMultiScale):
    pass


# nnUNetTrainer_<N>epochs exist in nnU-Net for the teacher and plain students; these are the KD counterparts, so a
# benchmark can train every model with the same schedule (setup_scripts/benchmark_real_data.sh).
def _with_epochs(base: type, epochs: int) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs

    name = f"{base.__name__}_{epochs}epochs"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


for _base in (nnUNetTrainerKDLogits, nnUNetTrainerKDLogitMatching, nnUNetTrainerKDClassAffinity,
              nnUNetTrainerKDMultiScale):
    for _epochs in (5, 10, 20, 50, 100, 250):
        _variant = _with_epochs(_base, _epochs)
        globals()[_variant.__name__] = _variant
