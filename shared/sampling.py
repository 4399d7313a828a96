"""The search strategies as a search task sees them: DARTS (`Differentiable`), and the searches that sample discrete
architectures inside the supernet instead of differentiating (random search with weight sharing, Li & Talwalkar
2019; REINFORCE in shared.controller). A sampled architecture is a set of alpha logits that are 0 on the chosen op
of each edge and -inf elsewhere, so the supernet's softmax is exactly one-hot and the supernet computes that cell
alone (edges left out take the 'none' op). Space-specific samplers say which edges and ops a cell may choose."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor, nn

from shared.errors import ConfigError
from shared.validation import check_choice


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


@dataclass(frozen=True)
class Decision:
    """One choice in describing a cell: a supernet lists its cells as decisions (`decisions()`) and turns one token
    per decision into one-hot alpha logits (`alphas_from(tokens)`)."""

    kind: str  # "input" | "op"
    choices: int  # tokens 0..choices-1
    distinct_from: int | None = None  # the index of an earlier decision whose token this one may not repeat


def uniform_tokens(decisions: Sequence[Decision], generator: torch.Generator) -> list[int]:
    """One token per decision, uniform over its allowed choices."""
    tokens: list[int] = []
    for decision in decisions:
        allowed = [c for c in range(decision.choices)
                   if decision.distinct_from is None or c != tokens[decision.distinct_from]]
        tokens.append(allowed[int(torch.randint(len(allowed), (), generator=generator))])
    return tokens


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


STRATEGIES = ("darts", "random", "reinforce")


def check_strategy(strategy: str, samples: int) -> None:
    """One line unless `strategy` is known and `samples` (cells scored per epoch: select_cells) a positive integer."""
    check_choice("strategy", strategy, STRATEGIES)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"select_cells must be a positive integer, got {samples!r}")


class Differentiable:
    """The search strategy as a search task sees it; this base is DARTS: the engine's architecture step trains the
    supernet's own alphas, every weight step trains the supernet as it is, and the genotype is read from the alphas.
    The sampling strategies (`SampledArchitectures`) override each step."""

    trains_alphas = True  # the alphas are trained, so their Hessian means something

    def arch_step(self, engine: Any, train_loss: Callable[..., Tensor], arch_loss: Callable[..., Tensor]) -> None:
        """Before a weight step: the engine's architecture step (a no-op for order=plain)."""
        engine.arch_step(train_loss, arch_loss)

    def weight_cell(self) -> ContextManager[None]:
        """The block runs the weight step with the cell it trains set: the supernet's own alphas."""
        return nullcontext()

    def update(self, reward: Callable[[], float]) -> dict[str, float] | None:
        """After a weight step: a learning strategy's own step (`reward` scores the cell set); none here."""
        return None

    def epoch_metrics(self) -> dict[str, float]:
        """What the strategy itself records per epoch; nothing here."""
        return {}

    def select(self, score: Callable[[], dict[str, float]], key: str) -> dict[str, float]:
        """The epoch's validation metrics (`score()`), for the genotype the alphas give."""
        return score()

    def chosen(self) -> ContextManager[None]:
        """The block runs with the alphas the genotype is read from set: the supernet's own."""
        return nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SampledArchitectures(Differentiable):
    """What the sampling strategies share: no architecture step; each weight step trains a drawn cell (`next`); after
    each epoch `samples` cells scored with the shared weights, the best kept as the epoch's genotype (`select`,
    `chosen`)."""

    trains_alphas = False

    def __init__(self, model: nn.Module, samples: int, seed: int) -> None:
        self.model, self.samples = model, samples
        self.generator = torch.Generator().manual_seed(seed)
        self.best: dict[str, Tensor] | None = None

    def next(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def arch_step(self, engine: Any, train_loss: Callable[..., Tensor], arch_loss: Callable[..., Tensor]) -> None:
        pass

    def weight_cell(self) -> ContextManager[None]:
        return alphas_set(self.model, self.next())

    def select(self, score: Callable[[], dict[str, float]], key: str) -> dict[str, float]:
        """Score `samples` cells (`score` runs with each one set), keep the one of lowest metric `key`, and return
        its metrics."""
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

    def chosen(self) -> ContextManager[None]:
        """The block runs with the best cell set (the model's own alphas before any selection)."""
        return nullcontext() if self.best is None else alphas_set(self.model, self.best)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.best = state["best"]


class RandomArchitectures(SampledArchitectures):
    """Random search with weight sharing (Li & Talwalkar 2019): every cell drawn uniformly over the supernet's
    decisions, from a checkpointed generator."""

    def next(self) -> dict[str, Tensor]:
        return self.model.alphas_from(uniform_tokens(self.model.decisions(), self.generator))
