"""What every experiment shares: observers, the one-line error treatment, artifact helpers.

This package is the only code that imports Sacred. Runs go to a FileStorageObserver under `runs/` (env
DARTS_RUNS_DIR moves it); with env DARTS_MONGO_URL set (e.g. mongodb://host:27017) a MongoObserver records them too
(database: env DARTS_MONGO_DB, default `darts`). Sacred's own `-F DIR` / `-m URL` flags add further observers.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
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
