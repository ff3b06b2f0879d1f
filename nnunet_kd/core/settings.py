"""Every `nnUNet_KD_*` variable this package reads, read and parsed here and nowhere else; the error a wrong setting
raises; and `nnUNet_extTrainer`, through which nnU-Net finds this package's trainers.

Two kinds: the run variables every trainer of the package shares (teacher, seed, training length; `RunEnvironment`),
and each method's settings, dataclasses whose fields are class defaults (nnU-Net-style trainer variants) overridable
by `nnUNet_KD_<field>`. Lists and booleans are parsed by the helpers below, once.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


class KDConfigurationError(RuntimeError):
    """A distillation run is set up wrongly; the message names the problem and the fix."""


# the trainer classes of this source tree (setup_scripts/install.sh installs nnunet-kd from it), for nnU-Net's
# nnUNet_extTrainer when the user has not set it
TRAINERS_FOLDER = Path(__file__).resolve().parents[2] / "trainers"


def ensure_ext_trainer() -> str:
    """nnUNet_extTrainer in this process: the user's, or this package's trainers when unset. nnU-Net finds trainer
    classes outside its own package only through it, and the commands that load or train this package's models must
    work without the user setting it up."""
    if not os.environ.get("nnUNet_extTrainer"):
        os.environ["nnUNet_extTrainer"] = str(TRAINERS_FOLDER)
    return os.environ["nnUNet_extTrainer"]


ENV_PREFIX = "nnUNet_KD_"
SETTINGS_FILE = "kd_settings.json"

ENV_TEACHER = ENV_PREFIX + "teacher"
ENV_TEACHER_FOLDS = ENV_PREFIX + "teacher_folds"
ENV_TEACHER_CHECKPOINT = ENV_PREFIX + "teacher_checkpoint"
ENV_TEACHER_TARGETS = ENV_PREFIX + "teacher_targets"
# the student's input channels by name, when it sees fewer than the dataset has (nnunet_kd.students.modalities)
ENV_STUDENT_CHANNELS = ENV_PREFIX + "student_channels"
ENV_SEED = ENV_PREFIX + "seed"
ENV_NUM_EPOCHS = ENV_PREFIX + "num_epochs"
ENV_ITERATIONS_PER_EPOCH = ENV_PREFIX + "iterations_per_epoch"
ENV_VAL_ITERATIONS_PER_EPOCH = ENV_PREFIX + "val_iterations_per_epoch"
# training-length variable -> the nnUNetTrainer attribute it sets
SCHEDULE_VARIABLES = {ENV_NUM_EPOCHS: "num_epochs", ENV_ITERATIONS_PER_EPOCH: "num_iterations_per_epoch",
                      ENV_VAL_ITERATIONS_PER_EPOCH: "num_val_iterations_per_epoch"}
RUN_VARIABLES = (ENV_TEACHER, ENV_TEACHER_FOLDS, ENV_TEACHER_CHECKPOINT, ENV_TEACHER_TARGETS, ENV_SEED,
                 ENV_STUDENT_CHANNELS, *SCHEDULE_VARIABLES)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KDConfigurationError(message)


def _is_finite_at_least(value: float, minimum: float, strict: bool = False) -> bool:
    return math.isfinite(value) and (value > minimum if strict else value >= minimum)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    _require(value in _TRUE + _FALSE, f"{name}={raw!r} is not true or false")
    return value in _TRUE


def parse_list(raw: str) -> list[str]:
    """'0,1, 2' or '0 1 2' -> ['0', '1', '2']."""
    return [item for item in raw.replace(",", " ").split() if item]


def parse_numbers(name: str, raw: str) -> list[float]:
    try:
        return [float(x) for x in parse_list(raw)]
    except ValueError as e:
        raise KDConfigurationError(f"{name}={raw!r} must be comma-separated numbers") from e


def parse_folds(raw: str) -> tuple[int | str, ...]:
    folds = parse_list(raw)
    _require(bool(folds), f"{ENV_TEACHER_FOLDS}={raw!r} names no fold. Use e.g. '0', '0,1,2,3,4' or 'all'.")
    try:
        return tuple(f if f == "all" else int(f) for f in folds)
    except ValueError as e:
        raise KDConfigurationError(f"{ENV_TEACHER_FOLDS}={raw!r} is not a fold list. Use e.g. '0', '0,1,2,3,4' or "
                                   f"'all'.") from e


def _whole_number(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    _require(value >= minimum, f"{name}={raw!r} must be a whole number >= {minimum}.")
    return value


@dataclass(frozen=True)
class RunEnvironment:
    """The run variables every trainer of this package reads (None: unset).

    teacher, teacher_folds, teacher_checkpoint: the teacher model folder (a `trainer__plans__configuration` name under
    `$nnUNet_results/<dataset>` or an absolute path), its fold(s) (several form an ensemble) and checkpoint file.
    seed: seeds Python, NumPy and torch when a trainer starts. num_epochs, iterations_per_epoch,
    val_iterations_per_epoch: training length, for lengths no named schedule class covers. teacher_targets: stored
    teacher outputs (`nnunet_kd teacher-targets`, a name under `$nnUNet_preprocessed/<dataset>/kd_targets` or a
    folder) that replace the teacher network.
    """

    teacher: str | None = None
    teacher_folds: tuple[int | str, ...] | None = None
    teacher_checkpoint: str | None = None
    teacher_targets: str | None = None
    seed: int | None = None
    schedule: tuple[tuple[str, int], ...] = ()  # (nnUNetTrainer attribute, value) pairs

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> RunEnvironment:
        def get(name: str) -> str | None:
            return environ.get(name) or None

        return cls(
            teacher=get(ENV_TEACHER),
            teacher_folds=parse_folds(get(ENV_TEACHER_FOLDS)) if get(ENV_TEACHER_FOLDS) else None,
            teacher_checkpoint=get(ENV_TEACHER_CHECKPOINT),
            teacher_targets=get(ENV_TEACHER_TARGETS),
            seed=_whole_number(ENV_SEED, get(ENV_SEED), 0) if get(ENV_SEED) else None,
            schedule=tuple((attribute, _whole_number(name, get(name), 1))
                           for name, attribute in SCHEDULE_VARIABLES.items() if get(name)))


@dataclass(frozen=True)
class BaseKDSettings:
    """Every field is a setting with a class default, overridable by the environment variable `nnUNet_KD_<field>`."""

    @classmethod
    def env_names(cls) -> dict[str, str]:
        return {f.name: ENV_PREFIX + f.name for f in fields(cls)}

    def with_environment(self, environ: Mapping[str, str] = os.environ) -> BaseKDSettings:
        """These settings with every `nnUNet_KD_<name>` variable that is set applied on top."""
        changes = {}
        for f in fields(self):
            value = environ.get(ENV_PREFIX + f.name)
            if value is None or value == "":
                continue
            kind = type(getattr(self, f.name))
            if kind is bool:  # bool("false") is True
                changes[f.name] = parse_bool(ENV_PREFIX + f.name, value)
                continue
            try:
                changes[f.name] = kind(value)
            except ValueError as e:
                raise KDConfigurationError(f"{ENV_PREFIX}{f.name}={value!r} is not a valid {kind.__name__}") from e
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def ignored_environment(cls, environ: Mapping[str, str] = os.environ) -> list[str]:
        """`nnUNet_KD_*` variables that are set but mean nothing to these settings or to the run (typos, another
        trainer's)."""
        known = set(cls.env_names().values()) | set(RUN_VARIABLES)
        return sorted(k for k, v in environ.items() if k.startswith(ENV_PREFIX) and v and k not in known)


@dataclass(frozen=True)
class KDSettings(BaseKDSettings):
    """alpha: weight of the KD term in `L = L_seg + alpha · L_KD`.
    scales: 'full' applies KD to the full-resolution output only; 'all' to every deep-supervision output, with the
    teacher's logits area-resampled to each scale and nnU-Net's deep-supervision weights.
    warmup: share of the epochs over which the KD weight rises linearly from alpha/E_w to alpha (0: none), so that
    the segmentation loss shapes a freshly initialised student first.
    """

    alpha: float = 1.0
    scales: str = "full"
    warmup: float = 0.0

    def __post_init__(self) -> None:
        _require(_is_finite_at_least(self.alpha, 0), f"KD alpha must be finite and >= 0, got {self.alpha}")
        _require(0 <= self.warmup <= 1, f"KD warmup must be a share of the epochs in [0, 1], got {self.warmup}")
        _require(self.scales in ("full", "all"), f"KD scales must be 'full' or 'all', got {self.scales!r}")


@dataclass(frozen=True)
class SoftTargetSettings(KDSettings):
    """temperature: T of `p = softmax(z / T)`; larger T exposes more of the teacher's non-argmax probabilities."""

    temperature: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(_is_finite_at_least(self.temperature, 0, strict=True),
                 f"KD temperature must be finite and > 0, got {self.temperature}")


@dataclass(frozen=True)
class GrowingAssistantSettings(SoftTargetSettings):
    """A teacher-assistant that grows inside one master network (nnUNetTrainerKDGrowingAssistant).

    max_width: the assistant's final channels per layer as a multiple of the student's (the master network's width).
    stages: how many widths the assistant takes, evenly spaced from just above the student's to max_width, each
    starting after an equal share of the epochs. alpha and temperature apply to both KD terms (teacher -> assistant,
    assistant -> student).
    """

    max_width: float = 4.0
    stages: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(_is_finite_at_least(self.max_width, 1, strict=True),
                 f"KD max_width must be a finite multiple of the student's width above 1, got {self.max_width}")
        _require(self.stages >= 1, f"KD stages must be >= 1, got {self.stages}")


@dataclass(frozen=True)
class MultiScaleSettings(BaseKDSettings):
    """`L = seg_weight · L_seg + soft_weight · Σ_i w_i L_soft_i + affinity_weight · Σ_i w_i CAKD_i` (Zhao et al. 2023).

    scale_weights: w_i per deep-supervision output, full resolution first ('0.4,0.2,0.2,0.2': the paper's four decoder
    scales); outputs beyond the list get 0. temperature: T of the soft-target term and of the class affinities.
    """

    seg_weight: float = 0.8
    soft_weight: float = 0.2
    affinity_weight: float = 0.1
    temperature: float = 1.0
    scale_weights: str = "0.4,0.2,0.2,0.2"

    def __post_init__(self) -> None:
        for name in ("seg_weight", "soft_weight", "affinity_weight"):
            value = getattr(self, name)
            _require(_is_finite_at_least(value, 0), f"KD {name} must be finite and >= 0, got {value}")
        _require(_is_finite_at_least(self.temperature, 0, strict=True),
                 f"KD temperature must be finite and > 0, got {self.temperature}")
        try:
            weights = parse_numbers("scale_weights", self.scale_weights)
        except KDConfigurationError:
            weights = []
        _require(bool(weights) and all(_is_finite_at_least(w, 0) for w in weights) and sum(weights) > 0,
                 f"KD scale_weights must be comma-separated non-negative numbers with a positive sum, got "
                 f"{self.scale_weights!r}")


def write_settings_file(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / SETTINGS_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def read_settings_file(folder: str | Path) -> dict | None:
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class BarlowTwinsSettings(BaseKDSettings):
    """Single-stage Barlow Twins KD for a student that sees fewer modalities (Choi et al. 2023).

    student_channels: the student's input channels, by name as in dataset.json `channel_names`, comma-separated, in
    the order the student's input files are numbered (`FLAIR,T1CE`: FLAIR is _0000, T1CE _0001). Required.
    `L = L_seg(student) + L_seg(teacher) + barlow_weight · L_BT(student bottleneck, teacher bottleneck)`.
    barlow_lambda: weight of the off-diagonal (redundancy) term inside L_BT. projector_dim: width of a shared 1x1x1
    projector applied to both bottlenecks before L_BT (0: none). teacher_receives_kd: whether L_BT also updates the
    teacher (true) or only the student (the teacher's features are detached).
    """

    student_channels: str = ""
    barlow_weight: float = 1.0
    barlow_lambda: float = 0.005
    projector_dim: int = 0
    teacher_receives_kd: bool = True

    def __post_init__(self) -> None:
        for name in ("barlow_weight", "barlow_lambda"):
            value = getattr(self, name)
            _require(_is_finite_at_least(value, 0), f"KD {name} must be finite and >= 0, got {value}")
        _require(self.projector_dim >= 0, f"KD projector_dim must be >= 0 (0: no projector), got {self.projector_dim}")
