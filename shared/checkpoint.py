"""Checkpoints: plain state dicts (loadable with `weights_only=True`), written atomically, with RNG states."""
from __future__ import annotations

import errno
import os
import pickle
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from shared.errors import CheckpointError

VERSION = 1


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file. A
    failed write (a full disk) is one CheckpointError; the previous checkpoint stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if path.is_file() else "no earlier checkpoint exists"
        fix = ("free space on that disk, or set DARTS_RUNS_DIR to another, and resume"
               if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make the run folder writable, and resume")
        raise CheckpointError(f"writing checkpoint {path} failed ({error.strerror or error}); {kept}: {fix}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _writer() -> str:
    """Who writes a temporary file: '<host>.<pid>' (a process id means something only on its own host)."""
    return f"{socket.gethostname().replace('.', '_')}.{os.getpid()}"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files of `save` beside `path` whose writing process, on this host, no longer exists (a
    write killed midway); a live writer's file, another host's and one this user may not delete are left alone.
    Returns what was removed."""
    host = _writer().rsplit(".", 1)[0]
    removed = []
    for tmp in path.parent.glob(f".{path.name}.{host}.*.tmp"):
        pid = tmp.name[len(f".{path.name}.{host}."):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:  # a read-only folder keeps its debris; reading the checkpoint still works
                continue
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`; every failure is one CheckpointError naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"  # a run folder: its checkpoint
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass resume=<run folder or checkpoint.pt>")
    remove_stale_temporaries(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint this toolkit wrote, or is damaged "
                              f"({_reason(error)}); resume from another checkpoint or start a new run") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format version {found!r}, this code reads version {VERSION}: "
                              f"resume it with the code that wrote it")
    return state


def _reason(error: BaseException) -> str:
    """Why torch could not read a file, without torch's advice to load it unsafely (weights_only=False)."""
    if "Weights only load failed" in str(error):
        return "it holds Python objects beyond tensors and plain data, which this toolkit never writes"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return first.rstrip(".") or type(error).__name__


def check_kind(state: dict[str, Any], path: str | Path, kind: str) -> None:
    """One line unless the checkpoint was written by experiment `kind` (checkpoints before the kind was recorded
    pass: their config is compared next)."""
    saved = state.get("kind")
    if saved is not None and saved != kind:
        raise CheckpointError(f"resume: {path} is a {saved} checkpoint, not a {kind} one: resume it with "
                              f"python -m experiments.{saved}, or pass a {kind} run folder")


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


# How an optimizer computes (not what): the code's choice, kept when a checkpoint's param groups replace its own.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, keeping its implementation flags (a checkpoint written before foreach=True would
    otherwise switch a resumed run back to one kernel per parameter)."""
    flags = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
