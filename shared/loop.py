"""The epoch loop every search and every training shares: epochs, evaluation, per-epoch records, checkpoints,
resume, divergence, time limit.

A search space or a training supplies an `EpochTask` (how to train one epoch, evaluate, read the genotype, and which
optimizers to checkpoint); the experiment supplies a `Recorder` (where records go: Sacred). This module knows
neither RNNs, CNNs nor Sacred.
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO

import torch
from torch import Tensor, nn
from tqdm import tqdm

from shared import checkpoint, distributed
from shared.collapse import EarlyStop, StopDecision, alpha_metrics
from shared.errors import UserFacingError
from shared.genotypes import Genotype, from_dict, to_dict

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """Raised inside an epoch when a loss is NaN or infinite; the loop turns it into `Diverged`."""


class Diverged(UserFacingError):
    """A run met a non-finite loss; the model was restored to its last checkpoint."""


class EpochTask(Protocol):
    """What a search space or a training hands the loop. A training's genotype is the fixed one it trains; it has
    no alphas and no genotype metrics (empty dicts)."""

    model: nn.Module
    kind: str  # the experiment whose checkpoints it writes (rnn_search, ...): checked first on resume

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...  # checkpointed under these names

    def train_epoch(self, epoch: int) -> dict[str, float]: ...  # raises NonFiniteLoss

    def evaluate(self) -> dict[str, float]: ...

    def genotype(self) -> Genotype: ...

    def genotype_metrics(self, genotype: Genotype) -> dict[str, float]: ...  # e.g. the share of identity

    def alpha_softmax(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...  # what model and optimizers do not hold: schedulers, streams

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedGenotypeTask:
    """What an `EpochTask` that trains one fixed genotype from scratch answers the loop: its genotype, no genotype
    metrics, no alphas, and its one optimizer `self.optimizer` (checkpointed as `weight_optimizer`)."""

    fixed_genotype: Genotype
    optimizer: torch.optim.Optimizer

    def genotype(self) -> Genotype:
        return self.fixed_genotype

    def genotype_metrics(self, genotype: Genotype) -> dict[str, float]:
        return {}

    def alpha_softmax(self) -> dict[str, Tensor]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"weight_optimizer": self.optimizer}


class SchedulerGeneratorState:
    """`state_dict` / `load_state_dict` of a task whose own checkpointed state is its learning-rate scheduler
    (`self.scheduler`) and its data generator (`self.generator`: shuffling, augmentation), with a fingerprint of
    its data (`self.data_fingerprint`) that a resume must match."""

    scheduler: Any
    generator: torch.Generator
    data_fingerprint: str

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "data": self.data_fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("data")  # None: a checkpoint from before the check
        if saved is not None and saved != self.data_fingerprint:
            raise checkpoint.CheckpointError(
                f"resume: the checkpoint's training data ({saved}) is not this data ({self.data_fingerprint}): the "
                f"split would put other images in each half; resume with the data_dir the run used")
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    metrics: dict[str, float]
    genotype: Genotype
    alphas: dict[str, list[list[float]]]
    stop: StopDecision | None = None  # set on the epoch an early-stopping rule ended the search after

    def to_dict(self) -> dict[str, Any]:
        data = {"epoch": self.epoch, "metrics": self.metrics, "genotype": to_dict(self.genotype),
                "alphas": self.alphas}
        return data if self.stop is None else {**data, "early_stop": self.stop.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpochRecord":
        stop = StopDecision(**data["early_stop"]) if "early_stop" in data else None
        return cls(data["epoch"], data["metrics"], from_dict(data["genotype"]), data["alphas"], stop)


def chosen_genotype(history: list[EpochRecord]) -> Genotype:
    """The genotype a run returns: the last epoch's, or the one its early stop chose."""
    stop = history[-1].stop
    return history[-1].genotype if stop is None else history[stop.genotype_epoch - 1].genotype


class Recorder(Protocol):
    def epoch(self, record: EpochRecord, history: list[EpochRecord]) -> None: ...

    def checkpoint(self, path: Path, epoch: int) -> None: ...


@dataclass
class Meter:
    """Sums of per-step quantities kept on the device (no host sync per step); checked for NaN every few steps."""

    check_every: int = 20
    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0

    def add(self, **values: Tensor | float) -> None:
        for name, value in values.items():
            value = value.detach().double() if isinstance(value, Tensor) else torch.tensor(float(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        if self.steps % self.check_every == 0:
            self.check()

    def check(self) -> dict[str, float]:
        """The sums as floats, over all processes of a distributed run (each sums its own shard); raises
        NonFiniteLoss when one is NaN or infinite (on every process alike)."""
        values = dict(zip(self.sums, distributed.totals([float(total) for total in self.sums.values()])))
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        if bad:
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} by step {self.steps}")
        return values


# Read at import, before a Sacred run redirects stderr to capture it.
_STARTED_ON_A_TERMINAL = sys.stderr is not None and sys.stderr.isatty()


@functools.lru_cache(maxsize=1)
def terminal() -> TextIO | None:
    """Where progress bars go: the controlling terminal, never stdout or stderr, which a run's captured output
    (cout.txt) or a batch job's log keeps (a bar's redrawn line would bury the epoch lines there); None without a
    terminal, and then no bars."""
    if not _STARTED_ON_A_TERMINAL:  # a batch job, a pipe, a test's child process
        return None
    try:
        return open("/dev/tty", "w", encoding="utf-8")  # noqa: SIM115 (open for the process's lifetime)
    except OSError:
        return None


class EpochProgress:
    """A `Meter` and a progress bar for one epoch (on the terminal, if any): `add` per step; every `show_every`
    steps the sums are checked (one host sync) and `postfix(sums)` goes on the bar; `close` returns the checked
    sums."""

    def __init__(self, total: int, description: str, postfix: Callable[[dict[str, float]], dict[str, str]],
                 show_every: int = 10) -> None:
        self.meter, self.description = Meter(), description
        self.bar = tqdm(total=total, desc=description, leave=False, mininterval=1.0, dynamic_ncols=True,
                        file=terminal(), disable=terminal() is None)
        self.postfix, self.show_every = postfix, show_every

    def add(self, **values: Tensor | float) -> None:
        try:
            self.meter.add(**values)
            if (self.meter.steps - 1) % self.show_every == 0:  # steps 1, 1 + show_every, ... (a bar off counts none)
                self.bar.set_postfix(self.postfix(self.meter.check()))
        except NonFiniteLoss:  # the epoch ends here: leave no bar open behind the error line
            self.bar.close()
            raise
        self.bar.update()

    def close(self) -> dict[str, float]:
        self.bar.close()
        return self.meter.check()


def capture(task: EpochTask, epoch: int, history: list[EpochRecord], config: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to continue after `epoch`, as plain state dicts."""
    streams = distributed.gather(checkpoint.rng_state())  # every process's random streams, by rank
    return {
        "epoch": epoch,
        "model": task.model.state_dict(),
        **{name: optimizer.state_dict() for name, optimizer in task.optimizers().items()},
        "task": task.state_dict(),
        "rng": streams[0],
        **({"process_rng": streams} if len(streams) > 1 else {}),  # a distributed run's
        "history": [record.to_dict() for record in history],
        "genotype": to_dict(task.genotype()),
        "config": config,
        "kind": task.kind,  # which experiment's task: checked first on resume
    }


def restore(task: EpochTask, state: dict[str, Any]) -> list[EpochRecord]:
    """Put the task back into a captured state; returns the epoch history it had. The task's own state goes first:
    it may check that the checkpoint fits the data (a vocabulary) before the model's shapes are compared."""
    task.load_state_dict(state["task"])
    task.model.load_state_dict(state["model"])
    for name, optimizer in task.optimizers().items():
        checkpoint.load_optimizer(optimizer, state[name])
    _restore_random_streams(state)
    return [EpochRecord.from_dict(record) for record in state["history"]]


def _restore_random_streams(state: dict[str, Any]) -> None:
    """Each process continues its own random streams (dropout masks); a process the checkpoint holds none for (a
    run resumed on more processes than it had) keeps the streams it was seeded with."""
    streams = state.get("process_rng") or [state["rng"]]
    rank = distributed.current().rank
    if rank < len(streams):
        checkpoint.set_rng_state(streams[rank])


def save(path: Path, state: dict[str, Any]) -> None:
    """Process 0 writes the checkpoint (the others' state is the same: they stay identical)."""
    if distributed.current().main:
        checkpoint.save(path, state)


def run_epochs(task: EpochTask, epochs: int, checkpoint_path: Path, recorder: Recorder, config: dict[str, Any],
               resume: dict[str, Any] | None = None,
               on_epoch_end: Callable[[EpochRecord], None] | None = None,
               deadline: float | None = None, early_stop: EarlyStop | None = None) -> list[EpochRecord]:
    """Run epochs `start+1..epochs`, checkpointing after each; `resume` is a loaded checkpoint to continue from.

    `early_stop` is consulted after every epoch; when it decides, that epoch's record carries the decision
    (`EpochRecord.stop`, kept in the checkpoint) and no further epoch runs (`chosen_genotype` is the result).

    `deadline` (a `time.monotonic()` value, e.g. a batch job's end): after the first epoch of this call, no epoch
    starts that the longest epoch so far would carry past it. The history returned is then shorter than `epochs`,
    and the checkpoint continues the run with `resume`.
    """
    history = restore(task, resume) if resume is not None else []
    for record in history:  # a resumed run carries the whole curve
        recorder.epoch(record, history[:record.epoch])
    if resume is None:  # epoch 0: what a divergence in the first epoch falls back to
        save(checkpoint_path, capture(task, 0, history, config))
    first, longest = len(history) + 1, 0.0
    for epoch in range(first, epochs + 1):
        # Process 0's clock decides for all: they must run the same epochs.
        if distributed.broadcast(deadline is not None and epoch > first and time.monotonic() + longest > deadline):
            log.info("time limit: stopping after epoch %d of %d; resume from %s", epoch - 1, epochs, checkpoint_path)
            break
        started = time.perf_counter()
        try:
            metrics = {**task.train_epoch(epoch), **task.evaluate()}
            if not all(math.isfinite(v) for v in metrics.values()):
                raise NonFiniteLoss(f"non-finite metrics {metrics}")
        except NonFiniteLoss as signal:
            _recover(task, checkpoint_path, epoch, str(signal))
        genotype = task.genotype()
        softmaxes = task.alpha_softmax()
        metrics.update(task.genotype_metrics(genotype), **alpha_metrics(softmaxes),
                       epoch_time=time.perf_counter() - started)
        longest = max(longest, metrics["epoch_time"])
        alphas = {name: a.tolist() for name, a in softmaxes.items()}
        history.append(EpochRecord(epoch, metrics, genotype, alphas))
        if early_stop is not None:
            history[-1].stop = early_stop.check([r.epoch for r in history], [r.metrics for r in history])
        save(checkpoint_path, capture(task, epoch, history, config))
        recorder.epoch(history[-1], history)
        recorder.checkpoint(checkpoint_path, epoch)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if on_epoch_end is not None:
            on_epoch_end(history[-1])
        if history[-1].stop is not None:
            log.info("early stop after epoch %d: %s; the search returns the genotype of epoch %d", epoch,
                     history[-1].stop.reason, history[-1].stop.genotype_epoch)
            break
    return history


def _recover(task: EpochTask, checkpoint_path: Path, epoch: int, reason: str) -> None:
    state = distributed.from_main(lambda: checkpoint.load(checkpoint_path))
    restore(task, state)
    raise Diverged(
        f"epoch {epoch} stopped: {reason}; the model is restored to the checkpoint of epoch {state['epoch']} "
        f"({checkpoint_path}). Start a new run with a lower learning rate or gradient clip (resume={checkpoint_path} "
        f"retries with the same config)")
