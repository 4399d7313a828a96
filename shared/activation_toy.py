"""The activation toy of NAS with reinforcement learning (Zoph & Le 2017), solved by REINFORCE and by DARTS.

Data y = 2x + noise; a two-layer scalar model y = g(h(x u) v) whose activations h and g are each linear or
sigmoid. Only (linear, linear) can fit y = 2x: a sigmoid layer adds an offset or saturates. The four rewards are the
fitted models' validation errors, so the answer is known and both searches can be checked against it:

- REINFORCE: a controller with P(a1 = sigmoid) = s(c) and P(a2 = sigmoid | a1) = s(w2 tanh(w1 a1 + b1) + b2)
  samples architectures, is rewarded with -MSE of the fitted model, an exponential moving average of the reward as
  baseline, and an entropy bonus.
- DARTS: each layer a softmax mixture of the two activations, u and v the weights, the bilevel engine in any order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.bilevel import Bilevel, BilevelConfig

ACTIVATIONS = ("linear", "sigmoid")
PAIRS = tuple(product(range(len(ACTIVATIONS)), repeat=2))  # (a1, a2): 0 linear, 1 sigmoid


def activation(index: int, z: Tensor) -> Tensor:
    return z if index == 0 else torch.sigmoid(z)


@dataclass(frozen=True)
class ToyData:
    x_train: Tensor
    y_train: Tensor
    x_valid: Tensor
    y_valid: Tensor


def toy_data(n: int = 256, noise: float = 0.1, seed: int = 0) -> ToyData:
    """x uniform in [-1, 1], y = 2x + noise * N(0, 1); two halves (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n, generator=generator, dtype=torch.float64) * 2 - 1
    y = 2 * x + noise * torch.randn(2 * n, generator=generator, dtype=torch.float64)
    return ToyData(x[:n], y[:n], x[n:], y[n:])


def fitted_mse(pair: tuple[int, int], data: ToyData, steps: int = 300, lr: float = 0.1) -> float:
    """Validation MSE of y = g(h(x u) v) with the activations of `pair`, u and v fitted by Adam on the train half
    from u = v = 0.5 (deterministic)."""
    u = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    v = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([u, v], lr=lr)

    def predict(x: Tensor) -> Tensor:
        return activation(pair[1], activation(pair[0], x * u) * v)

    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(predict(data.x_train), data.y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float(F.mse_loss(predict(data.x_valid), data.y_valid))


def rewards(data: ToyData) -> dict[tuple[int, int], float]:
    """The reward of every architecture: minus its fitted validation MSE (so REINFORCE can cache them)."""
    return {pair: -fitted_mse(pair, data) for pair in PAIRS}


# ---- REINFORCE ---------------------------------------------------------------------------------------------------
class ToyController(nn.Module):
    """P(a1 = sigmoid) = s(c); P(a2 = sigmoid | a1) = s(w2 tanh(w1 a1 + b1) + b2); every parameter starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.w1, self.b1, self.w2, self.b2 = (nn.Parameter(torch.zeros((), dtype=torch.float64))
                                                      for _ in range(5))

    def second_logit(self, a1: Tensor) -> Tensor:
        return self.w2 * torch.tanh(self.w1 * a1 + self.b1) + self.b2

    def log_prob(self, a1: Tensor, a2: Tensor) -> Tensor:
        """log P(a1, a2) for 0/1 tensors of samples."""
        first = -F.binary_cross_entropy_with_logits(self.c.expand_as(a1), a1, reduction="none")
        second = -F.binary_cross_entropy_with_logits(self.second_logit(a1), a2, reduction="none")
        return first + second

    def probabilities(self) -> dict[tuple[int, int], float]:
        """P of each of the four architectures."""
        with torch.no_grad():
            return {(a1, a2): math.exp(float(self.log_prob(torch.tensor(float(a1), dtype=torch.float64),
                                                           torch.tensor(float(a2), dtype=torch.float64))))
                    for a1, a2 in PAIRS}

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            a1 = torch.bernoulli(torch.sigmoid(self.c).expand(n), generator=generator)
            a2 = torch.bernoulli(torch.sigmoid(self.second_logit(a1)), generator=generator)
        return a1, a2

    def entropy(self) -> Tensor:
        """The joint entropy of (a1, a2), exact (four outcomes)."""
        a1 = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        a2 = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        log_p = self.log_prob(a1, a2)
        return -(log_p.exp() * log_p).sum()


@dataclass(frozen=True)
class ReinforceResult:
    probabilities: dict[tuple[int, int], float]  # the controller's final P of each architecture
    path: tuple[float, ...]  # P(linear, linear) after every step


def reinforce(reward: dict[tuple[int, int], float], steps: int = 300, samples: int = 8, lr: float = 0.05,
              baseline_decay: float = 0.9, entropy_weight: float = 1e-3, seed: int = 0) -> ReinforceResult:
    """REINFORCE with an EMA baseline and an entropy bonus over the cached rewards."""
    controller = ToyController()
    optimizer = torch.optim.Adam(controller.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    baseline, path = None, []
    for _ in range(steps):
        a1, a2 = controller.sample(samples, generator)
        r = torch.tensor([reward[(int(i), int(j))] for i, j in zip(a1, a2)], dtype=torch.float64)
        baseline = float(r.mean()) if baseline is None else baseline_decay * baseline + (1 - baseline_decay) * float(
            r.mean())
        loss = -((r - baseline) * controller.log_prob(a1, a2)).mean() - entropy_weight * controller.entropy()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        path.append(controller.probabilities()[(0, 0)])
    return ReinforceResult(controller.probabilities(), tuple(path))


# ---- DARTS -------------------------------------------------------------------------------------------------------
class MixedToy(nn.Module):
    """y = g(h(x u) v) with h and g softmax(alpha_layer)-weighted mixtures of linear and sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.v = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.alphas = nn.Parameter(torch.zeros(2, len(ACTIVATIONS), dtype=torch.float64))

    @staticmethod
    def mix(weights: Tensor, z: Tensor) -> Tensor:
        return sum(w * activation(k, z) for k, w in enumerate(weights))

    def forward(self, x: Tensor) -> Tensor:
        weights = F.softmax(self.alphas, dim=-1)
        return self.mix(weights[1], self.mix(weights[0], x * self.u) * self.v)


@dataclass(frozen=True)
class DartsResult:
    pair: tuple[int, int]  # the derived architecture: the stronger activation per layer
    softmax: tuple[tuple[float, float], tuple[float, float]]  # final softmax(alphas) per layer
    path: tuple[tuple[float, float], ...]  # softmax weight of linear in layers 1 and 2 after every step


def darts(data: ToyData, order: str, steps: int = 300, lr: float = 0.1, arch_lr: float = 0.05) -> DartsResult:
    """Our engine on the toy: SGD weight steps on the train half, Adam architecture steps on the valid half."""
    model = MixedToy()
    engine = Bilevel(model, torch.optim.SGD([model.u, model.v], lr=lr), torch.optim.Adam([model.alphas], lr=arch_lr),
                     BilevelConfig(order=order))

    def loss(x: Tensor, y: Tensor):
        return lambda forward: F.mse_loss(forward(x), y)

    train, valid = loss(data.x_train, data.y_train), loss(data.x_valid, data.y_valid)
    path = []
    for _ in range(steps):
        engine.arch_step(train, valid)
        engine.weight_step(train)
        weights = F.softmax(model.alphas.detach(), dim=-1)
        path.append((float(weights[0, 0]), float(weights[1, 0])))
    weights = F.softmax(model.alphas.detach(), dim=-1)
    pair = (int(weights[0].argmax()), int(weights[1].argmax()))
    softmax = tuple(tuple(float(w) for w in row) for row in weights)
    return DartsResult(pair, softmax, tuple(path))  # type: ignore[arg-type]


def name(pair: tuple[int, int]) -> str:
    return f"({ACTIVATIONS[pair[0]]}, {ACTIVATIONS[pair[1]]})"

