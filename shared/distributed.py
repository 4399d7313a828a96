"""Data-parallel runs on torch.distributed: the processes torchrun starts, averaging across them, batch statistics
over all of them, and which process writes.

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
from torch.nn.modules.batchnorm import _BatchNorm

from shared.errors import ConfigError, UserFacingError

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
    """Whether `error` is a collective that failed because another process stopped (gloo raises a RuntimeError
    naming its transport; nccl a DistError)."""
    message = str(error)
    return isinstance(error, dist.DistError) or (_current.several and any(
        sign in message for sign in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")))


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


# ---- batch statistics over all processes --------------------------------------------------------------------------
class _SumAcross(torch.autograd.Function):
    """all_reduce(SUM) as a differentiable function: the gradient of a sum over processes is the sum of the
    processes' gradients (itself through this function, so that double backward crosses processes too)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumAcross.apply(grad)


class SyncedBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch, over all processes, and differentiable to
    any order through them (torch's SyncBatchNorm runs on GPUs only and has no double backward, which the `exact`
    order needs). Running statistics (eval mode) and one process: torch's own kernel."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (_current.several and (self.training or not self.track_running_stats)):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.size(1)
        local_mean = input.mean(dims)
        local_m2 = (input - local_mean.view(shape)).square().sum(dims)  # centred here: no cancellation in float32
        local_mean, local_m2 = local_mean.double(), local_m2.double()
        counts = torch.full((1,), float(count), dtype=torch.float64, device=input.device)
        sums = _SumAcross.apply(torch.cat([local_mean * count, local_m2 + count * local_mean.square(), counts]))
        channels = input.size(1)
        n = sums[-1]
        mean = sums[:channels] / n
        var = sums[channels:2 * channels] / n - mean.square()  # biased, as the normalisation uses
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        scale = (var + self.eps).rsqrt()
        out = (input - mean.to(input.dtype).view(shape)) * scale.to(input.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def synced_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by a `SyncedBatchNorm` holding the same parameters and buffers (the
    state dict keeps its keys). Call it before the optimizers take the parameters."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncedBatchNorm):
        like = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        synced = SyncedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, **factory)
        synced.load_state_dict(module.state_dict())
        return synced.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, synced_batch_norm(child))
    return module


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """A freshly built model on `device`, ready for this run's processes: its BatchNorms synchronised when asked,
    process 0's values everywhere."""
    if _current.several and _current.sync_batch_norm:
        model = synced_batch_norm(model)
    model = model.to(device)
    same_everywhere(model)
    return model
