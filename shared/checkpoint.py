"""Checkpoints: plain state dicts (loadable with `weights_only=True`), written atomically, with RNG states."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from shared.errors import CheckpointError

VERSION = 1


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`; every failure is one CheckpointError naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"  # a run folder: its checkpoint
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass resume=<run folder or checkpoint.pt>")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({reason}); "
                              f"resume from another checkpoint or start a new run") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format version {found!r}, this code reads version {VERSION}: "
                              f"resume it with the code that wrote it")
    return state


def rng_state() -> dict[str, Any]:
    """The global RNG streams a search draws from (CPU, and CUDA when present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
