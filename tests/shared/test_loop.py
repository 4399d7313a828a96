"""The shared epoch loop's time limit, on a fake task and a fake clock (each epoch takes ten clock seconds)."""
from __future__ import annotations

import io
import time
from typing import Any

import pytest
import torch
from torch import nn

from shared.bilevel import Bilevel, BilevelConfig
from shared.genotypes import RNNGenotype
from shared.loop import EpochRecord, run_epochs

EPOCH_SECONDS = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTask:
    """The smallest EpochTask: one weight, one alpha; an epoch only advances the clock."""

    kind = "fake"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.model = nn.Module()
        self.model.w = nn.Parameter(torch.zeros(1))
        self.model.alpha = nn.Parameter(torch.zeros(1))
        self.engine = Bilevel(self.model, torch.optim.SGD([self.model.w], lr=0.1),
                              torch.optim.Adam([self.model.alpha]), BilevelConfig(order="first"))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.engine.optimizers()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.clock.now += EPOCH_SECONDS
        return {"train_loss": 1.0 / epoch}

    def evaluate(self) -> dict[str, float]:
        return {}

    def genotype(self) -> RNNGenotype:
        return RNNGenotype(recurrent=(("tanh", 0),), concat=(1,))

    def genotype_metrics(self, genotype: RNNGenotype) -> dict[str, float]:
        return {}

    def alpha_softmax(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Nowhere:
    def epoch(self, record: EpochRecord, history: list[EpochRecord]) -> None:
        pass

    def checkpoint(self, path, epoch: int) -> None:
        pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    monkeypatch.setattr(time, "perf_counter", clock)
    return clock


@pytest.mark.parametrize("budget, epochs_run", [
    (None, 5),  # no limit: every epoch
    (25.0, 2),  # after epoch 2 (t=20) the longest epoch (10 s) would end at 30 > 25
    (30.0, 3),  # an epoch that ends exactly at the deadline still runs
    (-5.0, 1),  # a deadline already passed: the call still does one epoch
])
def test_no_epoch_starts_that_the_longest_epoch_would_carry_past_the_deadline(tmp_path, clock: Clock,
                                                                              budget: float | None,
                                                                              epochs_run: int) -> None:
    deadline = None if budget is None else clock.now + budget
    history = run_epochs(FakeTask(clock), 5, tmp_path / "c.pt", Nowhere(), {}, deadline=deadline)
    assert [r.epoch for r in history] == list(range(1, epochs_run + 1))
    assert all(r.metrics["epoch_time"] == EPOCH_SECONDS for r in history)


def test_a_resumed_call_under_a_passed_deadline_still_does_one_epoch(tmp_path, clock: Clock) -> None:
    run_epochs(FakeTask(clock), 2, tmp_path / "c.pt", Nowhere(), {}, deadline=clock.now - 1)
    from shared import checkpoint

    state = checkpoint.load(tmp_path / "c.pt")
    history = run_epochs(FakeTask(clock), 5, tmp_path / "c.pt", Nowhere(), {}, resume=state, deadline=clock.now - 1)
    assert [r.epoch for r in history] == [1, 2]


def test_a_non_finite_loss_closes_the_epochs_progress_bar(monkeypatch) -> None:
    from shared import loop

    screen = io.StringIO()
    monkeypatch.setattr(loop, "terminal", lambda: screen)  # a terminal: the bar is drawn
    progress = loop.EpochProgress(30, "epoch 1", lambda sums: {})
    assert not progress.bar.disable
    with pytest.raises(loop.NonFiniteLoss):
        for _ in range(30):
            progress.add(loss=torch.tensor(float("nan")))
    assert progress.bar.disable and "epoch 1" in screen.getvalue()  # tqdm's mark of a closed bar


def test_progress_bars_go_to_the_terminal_only_never_to_stdout_or_stderr(monkeypatch, capsys) -> None:
    from shared import loop

    for screen in (io.StringIO(), None):  # a terminal, then none (a batch job, a pipe)
        monkeypatch.setattr(loop, "terminal", lambda: screen)
        progress = loop.EpochProgress(20, "epoch 1", lambda sums: {"loss": f"{sums['loss']:.2f}"}, show_every=5)
        for _ in range(20):
            progress.add(loss=torch.tensor(1.0))
        assert progress.close() == {"loss": 20.0}
        assert screen is None or "epoch 1" in screen.getvalue()
    assert capsys.readouterr() == ("", "")


def test_a_checkpoints_optimizer_keeps_the_codes_implementation_flags() -> None:
    """A checkpoint written before foreach=True brings foreach=None in its param groups: the hyperparameters and
    the momentum come from it, how the step is computed stays the code's."""
    from shared.checkpoint import load_optimizer

    old_p, new_p = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    old = torch.optim.SGD([old_p], lr=0.5, momentum=0.9)
    old_p.grad = torch.ones(3)
    old.step()
    new = torch.optim.SGD([new_p], lr=0.1, momentum=0.0, foreach=True)
    load_optimizer(new, old.state_dict())
    group = new.param_groups[0]
    assert group["foreach"] is True and group["lr"] == 0.5 and group["momentum"] == 0.9
    assert torch.equal(new.state[new_p]["momentum_buffer"], torch.ones(3))
