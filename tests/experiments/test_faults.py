"""Faults as they happen to real runs: a process killed with SIGKILL mid-epoch or mid-write, a full disk, two runs
started at once. Every experiment runs in a child process, killed for real."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from shared import checkpoint
from tests.conftest import REPO, run_experiment
from tests.experiments.conftest import tiny_data
from tests.experiments.test_bad_inputs import ARGS

EXPERIMENTS = ("rnn_search", "cnn_search", "rnn_train", "cnn_train")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"ptb": tiny_data("rnn", root), "cifar": tiny_data("cnn", root)}


def args_for(name: str, data: dict[str, Path], *extra: str) -> list[str]:
    return [part.format(**data) for part in (*ARGS[name], "epochs=2", *extra)]


@pytest.fixture(scope="module")
def whole(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The uninterrupted run of an experiment (made once, on first use)."""
    made: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in made:
            result = run_experiment(name, *args_for(name, data), runs=tmp_path_factory.mktemp(f"whole_{name}"))
            assert result.returncode == 0, result.stderr
            made[name] = result.run_dir()
        return made[name]

    return run


def child(name: str, args: list[str], runs: Path, prelude: str = "") -> subprocess.Popen:
    """`python -m experiments.<name> ARGS` as a child process, `prelude` run first in it (to inject a fault)."""
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{name!r}, *{args!r}]
        runpy.run_module("experiments.{name}", run_name="__main__")
    """)
    env = {**os.environ, "DARTS_RUNS_DIR": str(runs), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def only_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir() if p.name.isdigit()]
    assert len(folders) == 1, folders
    return folders[0]


def curves(folder: Path) -> dict[str, list[float]]:
    """Every logged metric's values by epoch, wall-clock ones left out."""
    metrics = json.loads((folder / "metrics.json").read_text())
    return {name: m["values"] for name, m in metrics.items() if not name.endswith("_time")}


def assert_same_run(resumed: Path, whole: Path) -> None:
    """Same metrics at every epoch, same final genotype and the same checkpoint tensors."""
    assert curves(resumed) == curves(whole)
    assert json.loads((resumed / "genotype.json").read_text()) == json.loads((whole / "genotype.json").read_text())
    a, b = checkpoint.load(resumed), checkpoint.load(whole)
    assert a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_run_killed_at_a_random_step_resumes_bit_identical(name: str, data: dict[str, Path], tmp_path: Path,
                                                             whole: Callable[[str], Path]) -> None:
    args = args_for(name, data)
    step = random.Random(name).randint(1, 4)  # a step of epoch 2 (the last), the same on every machine
    process = child(name, args, tmp_path / "killed", prelude=f"""
        import os, signal
        from shared.loop import EpochProgress
        real_add, steps = EpochProgress.add, []
        def add(self, **values):
            if self.description.startswith("epoch 2"):
                steps.append(1)
                if len(steps) == {step}:
                    os.kill(os.getpid(), signal.SIGKILL)
            real_add(self, **values)
        EpochProgress.add = add
    """)
    output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, output
    killed = only_run(tmp_path / "killed")
    assert checkpoint.load(killed)["epoch"] == 1
    resumed = run_experiment(name, *args, f"resume={killed}", runs=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(resumed.run_dir(), whole(name))


@pytest.mark.slow
def test_a_kill_during_the_checkpoint_write_keeps_the_previous_one_and_the_debris_goes(
        data: dict[str, Path], tmp_path: Path, whole: Callable[[str], Path]) -> None:
    args = args_for("rnn_search", data)
    # The second save (after epoch 1) dies with half a file written.
    process = child("rnn_search", args, tmp_path / "killed", prelude="""
        import os, signal, torch
        saves, real_save = [], torch.save
        def save(obj, handle, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                handle.write(b"PK half a checkpoint")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, handle, *args, **kwargs)
        torch.save = save
    """)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed = only_run(tmp_path / "killed")
    assert checkpoint.load(killed)["epoch"] == 0  # the previous checkpoint is whole
    assert not list(killed.glob(".checkpoint.pt.*.tmp"))  # loading it removed the dead writer's file
    resumed = run_experiment("rnn_search", *args, f"resume={killed}", runs=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(resumed.run_dir(), whole("rnn_search"))


def test_a_temporary_file_of_a_killed_write_is_removed_on_the_next_start(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    checkpoint.save(folder / "checkpoint.pt", {"epoch": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    debris = folder / f".checkpoint.pt.{host}.{int(dead.stdout)}.abc.tmp"
    debris.write_bytes(b"half")
    live = folder / f".checkpoint.pt.{host}.{os.getpid()}.abc.tmp"  # a writer still running: left alone
    live.write_bytes(b"half")
    assert checkpoint.load(folder)["epoch"] == 1
    assert not debris.exists() and live.exists()


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_keeps_the_previous_checkpoint(
        data: dict[str, Path], tmp_path: Path) -> None:
    process = child("rnn_search", args_for("rnn_search", data), tmp_path / "runs", prelude="""
        import errno, os, torch
        saves, real_save = [], torch.save
        def save(obj, handle, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, handle, *args, **kwargs)
        torch.save = save
    """)
    output, _ = process.communicate()
    assert process.returncode == 1, output
    errors = [line for line in output.splitlines() if "RunError" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], output
    assert "the previous checkpoint is kept" in errors[0] and "Traceback" not in output
    folder = only_run(tmp_path / "runs")
    assert json.loads((folder / "run.json").read_text())["status"] == "FAILED"
    assert checkpoint.load(folder)["epoch"] == 0
    assert not list(folder.glob(".checkpoint.pt.*.tmp"))


@pytest.mark.slow
def test_two_runs_started_at_once_get_their_own_folders(data: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    processes = [child("rnn_search", args_for("rnn_search", data, f"seed={seed}"), runs) for seed in (1, 2)]
    for process in processes:
        output, _ = process.communicate()
        assert process.returncode == 0, output
    folders = sorted(p for p in runs.iterdir() if p.name.isdigit())
    assert len(folders) == 2
    seeds = {json.loads((f / "config.json").read_text())["seed"] for f in folders}
    assert seeds == {1, 2}
    for folder in folders:
        assert json.loads((folder / "run.json").read_text())["status"] == "COMPLETED"
        assert checkpoint.load(folder)["epoch"] == 2
