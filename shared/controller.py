"""NAS with reinforcement learning over any supernet's cells: Zoph & Le's REINFORCE controller, trained as in ENAS
(Pham et al. 2018) by alternating shared-weight steps and controller steps.

A supernet describes its cells as a sequence of `Decision`s (RNN: per node a predecessor, then an op; CNN: per cell,
node and input slot an input, then an op, the second input never the first) and turns a token per decision into
one-hot alpha logits (`alphas_from`). The controller is an LSTM cell that reads the embedding of the previous token
and emits the next one from the head of the decision's kind, masked to its choices; `sample` returns the tokens, their
log-probability and entropy. (`shared.sampling.uniform_tokens` draws the same decisions uniformly: random search.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from shared.errors import ConfigError
from shared.sampling import Decision, Differentiable, RandomArchitectures, SampledArchitectures, alphas_set
from shared.validation import check_fields


@dataclass(frozen=True)
class ControllerConfig:
    """The REINFORCE controller of strategy=reinforce (ENAS's defaults where it has them)."""

    controller_hidden: int = 64  # LSTM cell size
    controller_lr: float = 3.5e-4  # Adam
    controller_every: int = 10  # one controller step after this many shared-weight steps
    controller_samples: int = 4  # cells sampled (and rewarded) per controller step
    entropy_weight: float = 1e-4  # bonus on the controller's entropy
    baseline_decay: float = 0.95  # the reward's exponential moving average, subtracted as baseline

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("controller_hidden", "controller_every", "controller_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.controller_lr < float("inf"):
            raise ConfigError(f"controller_lr must be positive, got {self.controller_lr!r}")
        if not 0 <= self.entropy_weight < float("inf"):
            raise ConfigError(f"entropy_weight must be >= 0, got {self.entropy_weight!r}")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError(f"baseline_decay must be in [0, 1), got {self.baseline_decay!r}")


class Controller(nn.Module):
    """An LSTM cell over the decisions; a learned start token, one embedding per token, one head per kind."""

    def __init__(self, decisions: Sequence[Decision], hidden: int = 64) -> None:
        super().__init__()
        self.decisions = tuple(decisions)
        self.width = max(d.choices for d in self.decisions)
        self.kinds = sorted({d.kind for d in self.decisions})
        self.embed = nn.Embedding(self.width + 1, hidden)  # token `width` is the start
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleDict({kind: nn.Linear(hidden, self.width) for kind in self.kinds})
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)  # ENAS's initialisation

    def logits(self, decision: Decision, h: Tensor, tokens: list[int]) -> Tensor:
        """The decision's masked logits (width,) from the LSTM output h (1, hidden)."""
        logits = self.heads[decision.kind](h)[0]
        mask = torch.arange(self.width, device=logits.device) >= decision.choices
        if decision.distinct_from is not None:
            mask[tokens[decision.distinct_from]] = True
        return logits.masked_fill(mask, float("-inf"))

    def run(self, generator: torch.Generator | None, given: Sequence[int] | None = None
            ) -> tuple[list[int], Tensor, Tensor]:
        """Sample tokens (or score `given` ones); returns them, the sum of their log-probabilities and of the
        entropies of the distributions they were drawn from."""
        device = self.embed.weight.device
        state = None
        previous = torch.tensor([self.width], device=device)
        tokens: list[int] = []
        log_prob = entropy = torch.zeros((), device=device)
        for i, decision in enumerate(self.decisions):
            state = self.cell(self.embed(previous), state)
            log_p = torch.log_softmax(self.logits(decision, state[0], tokens), dim=-1)
            p = log_p.exp()
            if given is not None:
                token = int(given[i])
            else:
                token = int(torch.multinomial(p.detach().cpu(), 1, generator=generator))
            tokens.append(token)
            log_prob = log_prob + log_p[token]
            entropy = entropy - (p * log_p.masked_fill(p == 0, 0.0)).sum()
            previous = torch.tensor([token], device=device)
        return tokens, log_prob, entropy


class ControllerArchitectures(SampledArchitectures):
    """strategy=reinforce: shared-weight steps train cells the controller samples (`next`); every
    `controller_every` steps `update` rewards `controller_samples` sampled cells (the task's reward, higher is better,
    with those cells set) and takes a REINFORCE step (EMA baseline, entropy bonus); after each epoch `select` keeps
    the best of `samples` sampled cells by the task's score, as ENAS derives its cell. Controller, its optimizer,
    baseline, random stream and the best cell are checkpointed (`state_dict`)."""

    def __init__(self, model: nn.Module, samples: int, seed: int, config: ControllerConfig) -> None:
        super().__init__(model, samples, seed)
        self.config = config
        self.controller = Controller(model.decisions(), config.controller_hidden).to(
            next(model.parameters()).device)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=config.controller_lr)
        self.baseline: float | None = None
        self.steps = 0
        self.figures: list[dict[str, float]] = []  # this epoch's controller steps

    def next(self) -> dict[str, Tensor]:
        with torch.no_grad():
            tokens, _, _ = self.controller.run(self.generator)
        return self.model.alphas_from(tokens)

    def update(self, reward: Callable[[], float]) -> dict[str, float] | None:
        """After a shared-weight step: every `controller_every` steps one REINFORCE step; returns its figures."""
        self.steps += 1
        if self.steps % self.config.controller_every:
            return None
        log_probs, entropies, rewards = [], [], []
        for _ in range(self.config.controller_samples):
            tokens, log_prob, entropy = self.controller.run(self.generator)
            with alphas_set(self.model, self.model.alphas_from(tokens)), torch.no_grad():
                rewards.append(float(reward()))
            log_probs.append(log_prob)
            entropies.append(entropy)
        mean = sum(rewards) / len(rewards)
        decay = self.config.baseline_decay
        self.baseline = mean if self.baseline is None else decay * self.baseline + (1 - decay) * mean
        advantage = torch.tensor(rewards, device=log_probs[0].device) - self.baseline
        loss = -(advantage * torch.stack(log_probs)).mean() - self.config.entropy_weight * torch.stack(entropies).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        figures = {"reward": mean, "baseline": self.baseline, "entropy": float(torch.stack(entropies).mean().detach())}
        self.figures.append(figures)
        return figures

    def epoch_metrics(self) -> dict[str, float]:
        """The means of this epoch's controller steps (`controller_reward`, `_baseline`, `_entropy`), then reset."""
        figures, self.figures = self.figures, []
        if not figures:
            return {}
        return {f"controller_{key}": sum(f[key] for f in figures) / len(figures) for key in figures[0]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "controller": self.controller.state_dict(),
                "optimizer": self.optimizer.state_dict(), "baseline": self.baseline, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline, self.steps = state["baseline"], state["steps"]


def strategy_for(strategy: str, model: nn.Module, samples: int, seed: int, config: ControllerConfig
                 ) -> Differentiable:
    """The search strategy `strategy` (shared.sampling.STRATEGIES) over `model`'s decisions."""
    if strategy == "random":
        return RandomArchitectures(model, samples, seed)
    if strategy == "reinforce":
        return ControllerArchitectures(model, samples, seed, config)
    return Differentiable()
