"""Command-line errors are one clear line (exit 2), never a traceback."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from nnunet_kd.tools.cli import main


@pytest.fixture
def empty_nnunet_folders(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["student-plans", "4", "--width", "0.25"],
    ["study", "4", "-p", "nnUNetPlans_KDStudent_w0.25", "--teacher", "/nowhere"],
    ["subset-channels", "4", "--channels", "FLAIR", "--dataset-id", "5"],
])
def test_an_unknown_dataset_is_one_line(empty_nnunet_folders, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Dataset 4 not found" in err and "Traceback" not in err


def test_report_without_workspace_says_where_it_looked(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nnunet_kd_demo") in err and "relative to the current folder" in err


def test_schedules_lists_where_generated_trainer_names_come_from(capsys):
    assert main(["schedules"]) == 0
    out = capsys.readouterr().out
    assert "_demo       num_epochs=6, num_iterations_per_epoch=20" in out and "_40x50" in out
    assert "nnUNet_KD_num_epochs" in out


def test_trainer_modules_import_nothing_beyond_nnunet_and_this_package():
    # nnU-Net's trainer search imports every module in nnUNet_extTrainer at every nnUNetv2_predict call: a trainer
    # module that pulled in another library would slow every prediction
    script = """
import os, sys
import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), "NoSuchTrainer",
                            "nnunetv2.training.nnUNetTrainer")
before = set(sys.modules)
sys.path.insert(0, sys.argv[1])
for module in sorted(os.listdir(sys.argv[1])):
    if module.endswith(".py"):
        __import__(module[:-3])
print("\\n".join(sorted(set(sys.modules) - before)))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(REPO / "trainers")], capture_output=True, text=True,
                          env={**os.environ, "nnUNet_raw": "", "nnUNet_preprocessed": "", "nnUNet_results": ""})
    assert proc.returncode == 0, proc.stderr
    new = proc.stdout.split()
    assert any(m.startswith("nnUNetTrainerKD") for m in new)
    assert [m for m in new if not (m.startswith("nnunet_kd") or m.startswith("nnUNetTrainer"))] == []


def test_a_new_method_file_gets_its_schedule_variants_without_a_list(tmp_path):
    # a new KD method is its loss and a trainer file: nnUNetTrainer_schedules.py finds it, no list to edit
    trainers = tmp_path / "trainers"
    shutil.copytree(REPO / "trainers", trainers, ignore=shutil.ignore_patterns("__pycache__"))
    (trainers / "nnUNetTrainerKDToy.py").write_text(
        "from nnUNetTrainerKDLogits import nnUNetTrainerKDLogits\n\n\n"
        "class nnUNetTrainerKDToy(nnUNetTrainerKDLogits):\n    pass\n")
    # the variants' direct bases: the new method's debug schedule, and a variant's of an existing method
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import nnUNetTrainer_schedules as s; "
              "print(s.nnUNetTrainerKDToy_debug.__bases__[0].__name__, "
              "s.nnUNetTrainerKDLogits_T4_demo.__bases__[0].__name__)")
    proc = subprocess.run([sys.executable, "-c", script, str(trainers)], capture_output=True, text=True,
                          env={**os.environ, "nnUNet_raw": "", "nnUNet_preprocessed": "", "nnUNet_results": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["nnUNetTrainerKDToy", "nnUNetTrainerKDLogits_T4"]


def test_commands_find_this_packages_trainers_unless_the_user_chose_a_folder(monkeypatch, tmp_path):
    from nnunet_kd.core.settings import TRAINERS_FOLDER, ensure_ext_trainer

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert ensure_ext_trainer() == str(TRAINERS_FOLDER) == os.environ["nnUNet_extTrainer"]
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    assert ensure_ext_trainer() == str(tmp_path)



def test_the_executable_exits_with_the_commands_status_and_all_its_output(tmp_path, capsys):
    # console_main skips the interpreter's last garbage collection: the output must still arrive whole, the status too
    executable = shutil.which("nnunet_kd", path=os.path.dirname(sys.executable))
    listed = subprocess.run([executable, "schedules"], capture_output=True, text=True)
    assert main(["schedules"]) == 0
    assert listed.returncode == 0 and listed.stdout == capsys.readouterr().out and len(listed.stdout) > 500
    refused = subprocess.run([executable, "report", "--workdir", str(tmp_path / "nowhere")], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("nnunet_kd: error:")
