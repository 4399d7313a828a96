"""Data-parallel runs on torch.distributed: the processes torchrun starts, averaging across them, and which process
writes (batch statistics over all of them: shared/sync_batch_norm.py).

`torchrun --nproc_per_node=N -m experiments.<name> with ...` starts N processes and tells each its RANK, LOCAL_RANK
and WORLD_SIZE (and, across machines, where to meet). `start` joins them into one process group (nccl on GPUs,
gloo on CPUs). Every process holds the whole model; each step it takes its own slice (`shard`) of the configured
global batch, and the gradients are averaged (`average_`) before any optimizer reads them, so the processes stay
identical and the learning rate means what it means on one process. Process 0 alone writes the run's records and
checkpoints. A single process (no torchrun) is world size 1, and every function here changes nothing.

State is per process and global, like torch.distributed's own process group: `start` sets it, `current` reads it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shared.errors import ConfigError, UserFacingError
from shared.sync_batch_norm import synced_batch_norm

TIMEOUT_MINUTES = 30  # a collective waits this long for a process that stopped answering


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank (0-based) of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # nccl | gloo once `start` joined the group; None on one process
    sync_batch_norm: bool = False  # batch statistics over all processes (`SyncedBatchNorm`)

    @property
    def main(self) -> bool:
        """Whether this process writes the run's records and checkpoints."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        """'rank 1 of 2' (for error lines)."""
        return f"rank {self.rank} of {self.world_size}"


_current = Processes()


def current() -> Processes:
    return _current


def launched() -> Processes:
    """The processes torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), before `start` joins
    them; one process without torchrun."""
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "").strip()
        try:
            values[name] = int(text) if text else None
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not an integer: launch with torchrun, which "
                              f"sets it, or unset it") from None
    world = values["WORLD_SIZE"] or 1
    rank = values["RANK"] or 0
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world}): launch with torchrun, which sets both")
    return Processes(rank, world, values["LOCAL_RANK"] or 0)


def start(device: torch.device, sync_batch_norm: bool) -> Processes:
    """Join the process group torchrun describes (nothing on one process) for work on `device` (`resolve_device`
    gives each process its own GPU); returns this process's place."""
    global _current
    processes = replace(launched(), sync_batch_norm=sync_batch_norm)
    if processes.several:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=TIMEOUT_MINUTES)
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            # torchrun's store outlives a restart (--max-restarts): without a prefix per attempt, a restarted
            # process can read a dead one's address and fail to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip() or "0"
            dist.init_process_group(backend, store=dist.PrefixStore(f"darts/attempt{attempt}", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
        processes = replace(processes, backend=backend)
    _current = processes
    return processes


def stop() -> None:
    """Leave the process group (at the end of a run)."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Processes()


# ---- averaging and sharing ------------------------------------------------------------------------------------------
def average_(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its mean over the processes, in place, with one collective for all of them (the
    engine's `reduce`: gradients)."""
    if not _current.several or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= _current.world_size
    for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(piece.view_as(tensor))


def totals(values: Sequence[float]) -> list[float]:
    """Each number summed over the processes (one collective)."""
    if not _current.several:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(summed)
    return summed.tolist()


def mean(value: float) -> float:
    """The mean of a number over the processes."""
    return totals([value])[0] / _current.world_size


def broadcast(value: Any) -> Any:
    """Process 0's `value` on every process (any picklable object)."""
    if not _current.several:
        return value
    box = [value if _current.main else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def from_main(produce: Callable[[], Any]) -> Any:
    """Process 0's `produce()` on every process (process 0 alone reads a checkpoint: the others' machines may not
    hold its file); a UserFacingError it raises is raised on every process, as one line each."""
    if not _current.several:
        return produce()
    result, error = None, None
    if _current.main:
        try:
            result = produce()
        except Exception as raised:  # the others must not wait for a value that never comes
            broadcast((None, raised if isinstance(raised, UserFacingError) else
                       UserFacingError(f"process 0 failed: {type(raised).__name__}: {raised}")))
            raise
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of a distributed run went away (gloo
    raises a RuntimeError about the connection; nccl and torch's store a DistNetworkError)."""
    message = str(error)
    return _current.several and (isinstance(error, dist.DistNetworkError) or any(
        sign in message for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")))


def gather(value: Any) -> list[Any]:
    """Every process's `value`, by rank, on every process."""
    if not _current.several:
        return [value]
    values: list[Any] = [None] * _current.world_size
    dist.all_gather_object(values, value)
    return values


def same_everywhere(module: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process (after building the model: the processes then start
    from one model even where their random streams or kernels differ)."""
    if not _current.several:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _device() -> torch.device:
    """Where nccl wants the tensors of a collective (the process's GPU); the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if _current.backend == "nccl" else torch.device("cpu")


# ---- data ---------------------------------------------------------------------------------------------------------
def shard(size: int, what: str) -> slice:
    """This process's contiguous part of `size` items (a global batch), equal for every process; one line unless
    `size` splits evenly (`what` names the config key)."""
    world = _current.world_size
    if size % world:
        raise ConfigError(f"{what}={size} does not split evenly over {world} processes: use a multiple of {world}, "
                          f"or another number of processes")
    part = size // world
    return slice(_current.rank * part, (_current.rank + 1) * part)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """A freshly built model on `device`, ready for this run's processes: its BatchNorms synchronised when asked,
    process 0's values everywhere."""
    if _current.several and _current.sync_batch_norm:
        model = synced_batch_norm(model)
    model = model.to(device)
    same_everywhere(model)
    return model
