"""Shared test fixtures: where the real data lives, and running an experiment the way a user does."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.forkserver import ForkServer

REPO = Path(__file__).resolve().parent.parent


def real_data_root() -> Path | None:
    """DARTS_TEST_DATA if set, else ../shared/data beside the checkout (CI has it); None when absent."""
    root = Path(os.environ.get("DARTS_TEST_DATA", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


def real_data(name: str) -> Path:
    """The real dataset folder `name` (ptb, cifar10), or skip the test."""
    root = real_data_root()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"real {name} data not found (set DARTS_TEST_DATA to the folder holding {name}/)")
    return root / name


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    runs: Path

    def run_dir(self, run_id: int | None = None) -> Path:
        """The Sacred run folder (the newest one when no id is given)."""
        ids = sorted(int(p.name) for p in self.runs.iterdir() if p.name.isdigit())
        return self.runs / str(run_id if run_id is not None else ids[-1])

    def run_json(self, run_id: int | None = None) -> dict:
        return json.loads((self.run_dir(run_id) / "run.json").read_text())

    def metrics(self, run_id: int | None = None) -> dict:
        return json.loads((self.run_dir(run_id) / "metrics.json").read_text())

    def info(self, run_id: int | None = None) -> dict:
        return json.loads((self.run_dir(run_id) / "info.json").read_text())

    def result(self, run_id: int | None = None) -> dict:
        """The experiment's result dict (run info `result`; run.json keeps its headline number)."""
        return self.info(run_id)["result"]


def run_experiment(module: str, *args: str, runs: Path, timeout: float = 600, env: dict | None = None,
                   new_interpreter: bool = False) -> RunResult:
    """`python -m experiments.<module> ARGS` in a child process with its runs under `runs`: forked from a server that
    has imported everything once (tests/forkserver.py), which saves the interpreter start (~2.5 s) per run. A new
    interpreter instead with `new_interpreter`, for `reproduce` (it compares with a run made in another process, whose
    hash seed differs) and when `env` sets a PYTHON* variable (read at an interpreter's start)."""
    global _server
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads_per_test())}
    full_env = {**os.environ, "DARTS_RUNS_DIR": str(runs), **offline, **(env or {})}  # OMP_NUM_THREADS: threads=0
    if new_interpreter or module == "reproduce" or any(key.startswith("PYTHON") for key in env or {}):
        proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        return RunResult(proc.returncode, proc.stdout, proc.stderr, runs)
    if _server is None:
        _server = ForkServer(REPO, {**_START_ENV, **offline}, Path(tempfile.gettempdir()) / "darts-fork-server.log")
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        try:
            returncode = _server.run(module, list(args), full_env, REPO, out, err, timeout)
        except TimeoutError:
            pytest.fail(f"experiments.{module} {' '.join(args)} ran past {timeout} s; it printed:\n"
                        f"{err.read_text(errors='replace')[-3000:]}")
        except (RuntimeError, OSError):
            _server.close()  # the next run starts a new server
            _server = None
            raise
        return RunResult(returncode, out.read_text(), err.read_text(), runs)


_server: ForkServer | None = None
_START_ENV = dict(os.environ)  # the server's, before any test changes it


def pytest_sessionfinish(session, exitstatus) -> None:
    if _server is not None:
        _server.close()


def assert_printed_config(module: str, args: tuple[str, ...], lines: tuple[str, ...], runs: Path) -> None:
    """`python -m experiments.<module> print_config ARGS` prints each of `lines` as a whole config line (so that
    `weight_decay = X` does not match `arch_weight_decay = X`)."""
    result = run_experiment(module, "print_config", *args, runs=runs)
    assert result.returncode == 0, result.stderr
    for line in lines:
        assert re.search(rf"^\s*{re.escape(line)}(\s|$)", result.stdout, re.MULTILINE), line


def threads_per_test() -> int:
    """Torch threads per test process (and per experiment it runs): DARTS_TEST_THREADS, else 2 (or 1 on one core).
    The suite runs one test at a time: two torch processes at once oversubscribe a 2-core machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(os.environ.get("DARTS_TEST_THREADS", min(2, usable)))


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """torch.compile with a backend that records each graph it is given and runs it through AOT autograd without
    code generation: the capture a real backend gets, in a fraction of the time; dynamo's caches are cleared after."""
    from torch._dynamo.backends.debugging import aot_eager

    recorded: list = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(
        fn, backend=lambda graph, inputs: recorded.append(graph) or aot_eager(graph, inputs)))
    yield recorded
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _small_thread_pool() -> None:
    torch.set_num_threads(threads_per_test())


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch) -> None:
    """Tests never wait on the network: the hub is off unless a test turns it back on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
