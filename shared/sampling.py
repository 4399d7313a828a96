"""Discrete architectures inside a supernet, for searches that sample instead of differentiating (random search with
weight sharing, Li & Talwalkar 2019): an architecture is a set of alpha logits that are 0 on the chosen op of each
edge and -inf elsewhere, so the supernet's softmax is exactly one-hot and the supernet computes that cell alone
(edges left out take the 'none' op). Space-specific samplers say which edges and ops a cell may choose."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from shared.errors import ConfigError


def one_hot_logits(rows: int, cols: int, choice: Sequence[int]) -> Tensor:
    """(rows, cols) logits: 0 at column choice[r] of row r, -inf elsewhere (softmax: exactly one-hot)."""
    logits = torch.full((rows, cols), float("-inf"))
    logits[torch.arange(rows), torch.as_tensor(list(choice))] = 0.0
    return logits


def none_column(primitives: Sequence[str]) -> int:
    """The column of the 'none' op, which an edge left out of a sampled cell takes; one line if there is none."""
    if "none" not in primitives:
        raise ConfigError("sampling architectures needs the 'none' op among the primitives (the edges a cell leaves "
                          "out take it); add it or search with strategy=darts")
    return list(primitives).index("none")


def uniform_op(primitives: Sequence[str], generator: torch.Generator) -> int:
    """A column drawn uniformly among the ops other than 'none'."""
    columns = [k for k, name in enumerate(primitives) if name != "none"]
    return columns[int(torch.randint(len(columns), (), generator=generator))]


@contextmanager
def alphas_set(model: nn.Module, logits: dict[str, Tensor]) -> Iterator[None]:
    """Run the block with the model's alpha parameters (by name) holding `logits`, then put them back."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in logits}
    try:
        with torch.no_grad():
            for name, value in logits.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


STRATEGIES = ("darts", "random")


def check_strategy(strategy: str, samples: int) -> None:
    """One line unless `strategy` is known and `samples` (architectures scored per epoch) a positive integer."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"random_samples must be a positive integer, got {samples!r}")


class RandomArchitectures:
    """Random search with weight sharing over a supernet that has `sample_alphas(generator)`: every weight step
    trains a freshly drawn cell (`next`); after each epoch `samples` drawn cells are scored with the shared weights
    and the best becomes the epoch's genotype (`select`). The draws come from its own generator, checkpointed with
    the best cell (`state_dict`)."""

    def __init__(self, model: nn.Module, samples: int, seed: int) -> None:
        self.model, self.samples = model, samples
        self.generator = torch.Generator().manual_seed(seed)
        self.best: dict[str, Tensor] | None = None

    def next(self) -> dict[str, Tensor]:
        return self.model.sample_alphas(self.generator)

    def select(self, score: Callable[[], dict[str, float]], key: str) -> dict[str, float]:
        """Score `samples` drawn cells (`score` runs with each one set), keep the one of lowest metric `key`, and
        return its metrics."""
        best: tuple[dict[str, Tensor], dict[str, float]] | None = None
        for _ in range(self.samples):
            logits = self.next()
            with alphas_set(self.model, logits):
                metrics = score()
            if best is None or metrics[key] < best[1][key]:
                best = logits, metrics
        assert best is not None
        self.best = best[0]
        return best[1]

    @contextmanager
    def chosen(self) -> Iterator[None]:
        """Run the block with the best cell set (the model's own alphas before any selection)."""
        if self.best is None:
            yield
        else:
            with alphas_set(self.model, self.best):
                yield

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.best = state["best"]
