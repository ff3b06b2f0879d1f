"""Unit tests for the distillation settings, their environment overrides and the kd_settings.json record."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nnunet_kd.core.settings import (
    RUN_VARIABLES,
    SETTINGS_FILE,
    KDConfigurationError,
    KDSettings,
    RunEnvironment,
    SoftTargetSettings,
    read_settings_file,
    write_settings_file,
)


def test_kd_settings_defaults() -> None:
    settings = KDSettings()
    assert (settings.alpha, settings.scales) == (1.0, "full")


def test_soft_target_settings_defaults() -> None:
    settings = SoftTargetSettings()
    assert (settings.alpha, settings.scales, settings.temperature) == (1.0, "full", 2.0)
    assert isinstance(settings, KDSettings)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SoftTargetSettings().alpha = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"alpha": -1.0}, {"scales": "some"}, {"temperature": 0.0},
                                    {"temperature": -2.0}])
def test_invalid_settings_are_rejected_on_construction(kwargs) -> None:
    with pytest.raises(KDConfigurationError):
        SoftTargetSettings(**kwargs)


def test_alpha_zero_is_allowed() -> None:
    assert SoftTargetSettings(alpha=0.0).alpha == 0.0


def test_env_names() -> None:
    assert SoftTargetSettings.env_names() == {"alpha": "nnUNet_KD_alpha", "scales": "nnUNet_KD_scales",
                                              "warmup": "nnUNet_KD_warmup", "temperature": "nnUNet_KD_temperature"}


def test_with_environment_applies_every_variable() -> None:
    defaults = SoftTargetSettings()
    settings = defaults.with_environment({"nnUNet_KD_alpha": "0.5", "nnUNet_KD_temperature": "4",
                                          "nnUNet_KD_scales": "all"})
    assert settings == SoftTargetSettings(alpha=0.5, scales="all", temperature=4.0)
    assert type(settings) is SoftTargetSettings
    assert isinstance(settings.temperature, float) and isinstance(settings.alpha, float)
    assert defaults == SoftTargetSettings()  # the defaults themselves are untouched


def test_with_environment_applies_only_what_is_set() -> None:
    defaults = SoftTargetSettings(alpha=0.3, temperature=3.0, scales="all")
    settings = defaults.with_environment({"nnUNet_KD_temperature": "8", "nnUNet_results": "/results"})
    assert settings == SoftTargetSettings(alpha=0.3, temperature=8.0, scales="all")


def test_with_environment_ignores_empty_strings() -> None:
    defaults = SoftTargetSettings(alpha=0.3)
    empty = {"nnUNet_KD_alpha": "", "nnUNet_KD_temperature": "", "nnUNet_KD_scales": ""}
    assert defaults.with_environment(empty) == defaults


@pytest.mark.parametrize(("name", "value"), [("nnUNet_KD_alpha", "-1"), ("nnUNet_KD_alpha", "abc"),
                                             ("nnUNet_KD_temperature", "0"), ("nnUNet_KD_temperature", "two"),
                                             ("nnUNet_KD_scales", "some"), ("nnUNet_KD_scales", "Full")])
def test_with_environment_rejects_invalid_values(name, value) -> None:
    with pytest.raises(KDConfigurationError):
        SoftTargetSettings().with_environment({name: value})


def test_with_environment_error_names_the_variable() -> None:
    with pytest.raises(KDConfigurationError, match="nnUNet_KD_alpha='abc' is not a valid float"):
        SoftTargetSettings().with_environment({"nnUNet_KD_alpha": "abc"})


@pytest.mark.parametrize(("name", "value"), [("nnUNet_KD_alpha", "nan"), ("nnUNet_KD_alpha", "inf"),
                                             ("nnUNet_KD_temperature", "nan"), ("nnUNet_KD_temperature", "inf")])
def test_with_environment_rejects_non_finite_numbers(name, value) -> None:
    try:
        SoftTargetSettings().with_environment({name: value})
    except KDConfigurationError:
        return
    raise AssertionError(f"{name}={value} was accepted")


def test_kd_settings_with_environment_applies_alpha_and_scales() -> None:
    settings = KDSettings(alpha=0.1).with_environment({"nnUNet_KD_alpha": "0.5", "nnUNet_KD_scales": "all"})
    assert settings == KDSettings(alpha=0.5, scales="all")


def test_kd_settings_ignored_environment_reports_temperature_as_unused() -> None:
    environ = {"nnUNet_KD_alpha": "0.5", "nnUNet_KD_temperature": "4"}
    assert KDSettings.ignored_environment(environ) == ["nnUNet_KD_temperature"]


def test_kd_settings_to_json() -> None:
    assert KDSettings(alpha=0.1).to_json() == {"alpha": 0.1, "scales": "full", "warmup": 0.0}


def test_ignored_environment_lists_unknown_kd_variables_only() -> None:
    environ = {
        "nnUNet_KD_alpha": "0.5",  # known setting
        "nnUNet_KD_temprature": "4",  # typo
        "nnUNet_KD_beta": "1",  # another trainer's
        "nnUNet_KD_teacher": "/models/teacher",  # a run variable
        "nnUNet_KD_num_epochs": "3",  # a run variable
        "nnUNet_KD_unset": "",  # set but empty: means nothing
        "nnUNet_results": "/results",  # not a KD variable
    }
    assert SoftTargetSettings.ignored_environment(environ) == ["nnUNet_KD_beta", "nnUNet_KD_temprature"]


def test_ignored_environment_is_empty_for_known_variables() -> None:
    environ = {name: "1" for name in (*SoftTargetSettings.env_names().values(), *RUN_VARIABLES)}
    assert SoftTargetSettings.ignored_environment(environ) == []


def test_run_environment_reads_every_run_variable_once() -> None:
    run = RunEnvironment.read({"nnUNet_KD_teacher": "T", "nnUNet_KD_teacher_folds": "0, 1 all",
                               "nnUNet_KD_teacher_checkpoint": "checkpoint_best.pth", "nnUNet_KD_seed": "3",
                               "nnUNet_KD_teacher_targets": "teacher__f0-1",
                               "nnUNet_KD_num_epochs": "40", "nnUNet_KD_iterations_per_epoch": "50",
                               "nnUNet_KD_val_iterations_per_epoch": ""})
    assert run == RunEnvironment(teacher="T", teacher_folds=(0, 1, "all"), teacher_checkpoint="checkpoint_best.pth",
                                 teacher_targets="teacher__f0-1", seed=3,
                                 schedule=(("num_epochs", 40), ("num_iterations_per_epoch", 50)))
    assert RunEnvironment.read({}) == RunEnvironment()


@pytest.mark.parametrize("name, value, message", [
    ("nnUNet_KD_num_epochs", "0", "whole number >= 1"), ("nnUNet_KD_iterations_per_epoch", "2.5", "whole number"),
    ("nnUNet_KD_seed", "-1", "whole number >= 0"), ("nnUNet_KD_teacher_folds", ",", "names no fold")])
def test_run_environment_names_a_bad_value(name, value, message) -> None:
    with pytest.raises(KDConfigurationError, match=message):
        RunEnvironment.read({name: value})


def test_to_json_round_trips_through_constructor() -> None:
    settings = SoftTargetSettings(alpha=0.25, scales="all", temperature=3.0)
    record = json.loads(json.dumps(settings.to_json()))
    assert record == {"alpha": 0.25, "scales": "all", "temperature": 3.0, "warmup": 0.0}
    assert SoftTargetSettings(**record) == settings


def test_settings_file_round_trip(tmp_path) -> None:
    record = {"trainer": "nnUNetTrainerKDLogits", "settings": SoftTargetSettings().to_json(),
              "teacher": {"folds": [0, "all"], "checkpoint_sha256": ["ab" * 32]}, "loss": {"weights": [1.0, 0.0]}}
    path = write_settings_file(tmp_path, record)
    assert path == tmp_path / SETTINGS_FILE
    assert path.name == "kd_settings.json"
    assert read_settings_file(tmp_path) == record
    assert read_settings_file(str(tmp_path)) == record


def test_settings_file_is_overwritten(tmp_path) -> None:
    write_settings_file(tmp_path, {"a": 1})
    write_settings_file(tmp_path, {"b": 2})
    assert read_settings_file(tmp_path) == {"b": 2}


def test_read_settings_file_returns_none_when_missing(tmp_path) -> None:
    assert read_settings_file(tmp_path) is None
    assert read_settings_file(tmp_path / "not_a_folder") is None


def test_seed_from_environment_makes_initialisation_repeatable():
    import torch

    from nnunet_kd.core.schedule import seed_from_environment

    assert seed_from_environment({}) is None
    assert seed_from_environment({"nnUNet_KD_seed": "7"}) == 7
    first = torch.randn(3)
    seed_from_environment({"nnUNet_KD_seed": "7"})
    assert torch.equal(first, torch.randn(3))


def test_kd_warmup_ramps_the_kd_weight_over_its_share_of_the_epochs() -> None:
    from types import SimpleNamespace

    from nnunet_kd.core.output_space import nnUNetTrainerKD

    def ramp(warmup: float, epoch: int, epochs: int = 40) -> float:
        run = SimpleNamespace(kd_settings=SoftTargetSettings(warmup=warmup), num_epochs=epochs, current_epoch=epoch)
        return nnUNetTrainerKD.kd_ramp.fget(run)

    assert [ramp(0.25, e) for e in (0, 4, 9, 10, 39)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert ramp(0.0, 0) == 1.0
    assert ramp(0.25, 0, epochs=2) == 1.0  # a warm-up shorter than one epoch is none
    with pytest.raises(KDConfigurationError, match="warmup"):
        SoftTargetSettings(warmup=1.5)
