"""What every experiment shares: observers, the one-line error treatment, artifact helpers.

This package is the only code that imports Sacred. Runs go to a FileStorageObserver under `runs/` (env
DARTS_RUNS_DIR moves it); with env DARTS_MONGO_URL set (e.g. mongodb://host:27017) a MongoObserver records them too
(database: env DARTS_MONGO_DB, default `darts`). Sacred's own `-F DIR` / `-m URL` flags add further observers.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised by sacred 0.8.7's import
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds

from shared.errors import UserFacingError


class RunError(SacredError):
    """A problem with the user's input: printed as one line, and the run is recorded as FAILED."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_traceback=False)


def runs_dir() -> Path:
    return Path(os.environ.get("DARTS_RUNS_DIR", "runs"))


def make_experiment(name: str) -> Experiment:
    """An experiment with the house observers; captured output keeps only the last state of progress bars."""
    ex = Experiment(name, save_git_info=False)  # Sacred's own probe crashes on repos without commits
    ex.pre_run_hook(_record_git)
    ex.observers.append(FileStorageObserver(str(runs_dir())))
    mongo_url = os.environ.get("DARTS_MONGO_URL")
    if mongo_url:
        from sacred.observers import MongoObserver

        ex.observers.append(MongoObserver(url=mongo_url, db_name=os.environ.get("DARTS_MONGO_DB", "darts")))
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    return ex


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes; empty outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _record_git(_run: Any) -> None:
    _run.info["git"] = git_state()


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserFacingError raised by library code into a one-line RunError."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserFacingError as error:
            raise RunError(str(error)) from None

    return wrapper


def add_json_artifact(run: Any, name: str, data: Any) -> None:
    """Store `data` as a JSON artifact `name` of the run (written to a temp file first)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(json.dumps(data, indent=2))
        run.add_artifact(str(path), name=name)


def run_folder(run: Any) -> Path:
    """Where this run keeps its checkpoint: its FileStorageObserver folder, else a fresh temporary folder."""
    for observer in run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir)
    return Path(tempfile.mkdtemp(prefix=f"darts-run-{run._id}-"))


class SacredRecorder:
    """Sends the shared search loop's per-epoch records to a Sacred run (implements shared.search.Recorder).

    Metrics go through `log_scalar` under stable names with the epoch as step; the genotype goes to run info
    (`genotype`, `genotype_history`) and to the artifacts `genotype.json` and `genotype_history.json`; the softmax of
    the alphas of every epoch goes to `alphas.json`; the checkpoint is the run folder's `checkpoint.pt` (and an
    artifact for observers that keep no folder, such as MongoDB).
    """

    def __init__(self, run: Any, folder: Path) -> None:
        self.run, self.folder = run, folder

    def epoch(self, record: Any, history: list[Any]) -> None:
        from shared.genotypes import to_dict

        for name, value in record.metrics.items():
            self.run.log_scalar(name, value, record.epoch)
        genotypes = [{"epoch": r.epoch, "genotype": to_dict(r.genotype)} for r in history]
        self.run.info["genotype"] = to_dict(record.genotype)
        self.run.info["genotype_history"] = genotypes
        self.run.info["alphas"] = record.alphas
        self.run.info["epochs_done"] = record.epoch
        add_json_artifact(self.run, "genotype.json", to_dict(record.genotype))
        add_json_artifact(self.run, "genotype_history.json", genotypes)
        add_json_artifact(self.run, "alphas.json", [{"epoch": r.epoch, "alphas": r.alphas} for r in history])

    def checkpoint(self, path: Path, epoch: int) -> None:
        self.run.info["checkpoint"] = str(path)
        if path.parent != self.folder or any(not isinstance(o, FileStorageObserver) for o in self.run.observers):
            self.run.add_artifact(str(path), name="checkpoint.pt")


# Keys that may differ between a run and the run that resumes it (a search whose schedule spans `epochs` removes it).
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "device", "data_dir", "threads", "time_limit"})


def check_resume_config(saved: dict[str, Any], current: dict[str, Any],
                        may_change: frozenset[str] = RESUMABLE_CHANGES) -> None:
    """A resumed run must continue the same search: every other config value must match the checkpoint's."""
    from shared.errors import ConfigError

    keys = (set(saved) | set(current)) - may_change
    differ = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"resume: the config differs from the checkpoint's ({shown}); "
                          f"pass the original run's named configs and values along with resume=")


def run_search(run: Any, config: dict[str, Any], build_task: Callable[[], Any],
               may_change: frozenset[str] = RESUMABLE_CHANGES) -> list[Any]:
    """What every search experiment does around its task: threads, seed, resume, checkpoint folder, the loop, and
    the time limit (config `time_limit`, minutes from now: no epoch starts that would end after it, judged by the
    longest epoch so far; run info `stopped_early` says where it stopped)."""
    import torch

    from shared import checkpoint
    from shared.errors import ConfigError
    from shared.search import search

    started = time.monotonic()  # the time limit counts data loading too
    limit = config.get("time_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
                              or not math.isfinite(limit)):
        raise ConfigError(f"time_limit must be a positive number of minutes or None, got {limit!r}")
    if isinstance(config["epochs"], bool) or not isinstance(config["epochs"], int) or config["epochs"] < 1:
        raise ConfigError(f"epochs must be a positive integer, got {config['epochs']!r}")
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    resume_state = checkpoint.load(config["resume"]) if config.get("resume") else None
    if resume_state is not None:
        check_resume_config(resume_state["config"], config, may_change)
        if resume_state["epoch"] >= config["epochs"]:
            more = f"; raise epochs above {resume_state['epoch']} to continue" if "epochs" in may_change else ""
            raise ConfigError(f"resume: the checkpoint has done {resume_state['epoch']} epochs and epochs="
                              f"{config['epochs']}: nothing is left to run{more}")
        run.info["resumed_from"] = {"checkpoint": str(config["resume"]), "epoch": resume_state["epoch"]}
    folder = run_folder(run)
    task = build_task()
    history = search(task, config["epochs"], folder / "checkpoint.pt", SacredRecorder(run, folder), config,
                     resume_state, deadline=None if limit is None else started + 60.0 * limit)
    if history and history[-1].epoch < config["epochs"]:
        run.info["stopped_early"] = {"after_epoch": history[-1].epoch, "of": config["epochs"],
                                     "resume": f"resume={folder}"}
    return history


def search_result(history: list[Any], metric: str, best: Callable[[Any], Any] = min) -> dict[str, Any]:
    """The run's result: the final genotype, the final and the best value of its headline metric."""
    from shared.genotypes import to_dict

    final = history[-1]
    return {"genotype": to_dict(final.genotype), metric: final.metrics[metric],
            f"best_{metric}": best(r.metrics[metric] for r in history)}
