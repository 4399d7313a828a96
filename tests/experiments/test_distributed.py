"""A search started by torchrun, as a user starts it: process 0 alone records; when a process dies the others stop
with a line each, torchrun's restart resumes from the last checkpoint, and so may a single process. (The sums and
shards of two processes: tests/shared/test_distributed.py.)"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.tracking.errors import RunError
from shared import checkpoint
from shared.errors import CheckpointError
from tests.conftest import REPO, run_experiment
from tests.experiments.test_faults import curves
from tests.experiments.conftest import TINY, tiny_data


def torchrun(module: str, *args: str, runs: Path, processes: int = 2, restarts: int = 0) -> subprocess.Popen:
    """`torchrun --nproc_per_node=N --max-restarts=R --standalone -m experiments.<module> ARGS`, its runs under
    `runs`."""
    env = {**os.environ, "DARTS_RUNS_DIR": str(runs), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--max-restarts={restarts}", "--standalone", "-m", f"experiments.{module}", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"torchrun ran past {timeout} s:\n{process.communicate()[0][-3000:]}")


def workers(agent: subprocess.Popen) -> dict[int, int]:
    """The process ids of torchrun's workers by rank."""
    found = {}
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0")
                       if "=" in item)
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(child)
    return found


def epoch_of(path: Path) -> int | None:
    """The epoch of the checkpoint at `path` (written by a rename: whole or absent), None while there is none."""
    try:
        return checkpoint.load(path)["epoch"]
    except CheckpointError:
        return None


@pytest.mark.slow
def test_two_processes_record_once_and_a_dead_one_restarts_the_job_from_its_checkpoint_or_one_resumes_it(
        tmp_path: Path) -> None:
    runs, data = tmp_path / "runs", tiny_data("rnn", tmp_path)
    args = ("with", "smoke", f"data_dir={data}", *TINY["rnn"], "epochs=2")
    agent = torchrun("rnn_search", *args, runs=runs, restarts=1)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill rank 1 in epoch 2, once epoch 1's checkpoint is written
        if epoch_of(runs / "1" / "checkpoint.pt") == 1:
            break
        assert agent.poll() is None, agent.communicate()[0][-3000:]
        time.sleep(0.1)
    os.kill(workers(agent)[1], signal.SIGKILL)
    output = finish(agent)
    assert agent.returncode == 0, output[-3000:]
    assert re.search(r"Terminated: rank 0 of 2: (another process of this run stopped|stopped by SIGTERM) after "
                     r"epoch 1 \(.*torchrun.* names .*rank\): resume with resume=\S+/runs/1\n", output), output[-3000:]
    killed, restarted = runs / "1", runs / "2"  # torchrun's second attempt resumed the first's checkpoint
    assert sorted(p.name for p in runs.iterdir() if p.name.isdigit()) == ["1", "2"]  # process 0's alone
    assert output.count("Started run with ID") == 2  # process 1 logs warnings and errors only
    assert "No observers have been added" not in output
    assert json.loads((killed / "run.json").read_text())["status"] == "INTERRUPTED"
    assert json.loads((restarted / "info.json").read_text())["distributed"] == {
        "world_size": 2, "backend": "gloo", "seeds": [3, 4], "sync_batch_norm": False}
    alone = run_experiment("rnn_search", *args, f"resume={killed}", runs=runs)  # and one process may continue it
    assert alone.returncode == 0, alone.stderr
    for folder in (restarted, alone.run_dir()):
        assert json.loads((folder / "run.json").read_text())["status"] == "COMPLETED"
        info = json.loads((folder / "info.json").read_text())
        assert info["resumed_from"] == {"checkpoint": str(killed), "epoch": 1}
        assert ("distributed" in info) == (folder == restarted)
        assert len(curves(folder)["valid_ppl"]) == 2  # epoch 1 carried over, epoch 2 run
        assert curves(folder)["valid_ppl"][0] == curves(killed)["valid_ppl"][0]


def test_an_error_line_names_the_process_that_prints_it(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert str(RunError("batch_size=5 does not split evenly")) == "rank 1 of 2: batch_size=5 does not split evenly"
    monkeypatch.delenv("RANK"), monkeypatch.delenv("WORLD_SIZE")
    assert str(RunError("no data")) == "no data"
