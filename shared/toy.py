"""The illustrative bilevel problem of the DARTS paper (section 2.3), with a closed-form answer.

    L_val(w, a) = a*w - 2a + 1        L_train(w, a) = w^2 - 2aw + a^2

w*(a) = a, so the true bilevel optimum is a = 1. Alternating a plain-SGD weight step of learning rate xi with a
second-order architecture step has the fixed point a = w = 2 / (1 + 2 xi) (a = 1 at xi = 0.5); first order, which
ignores dw*/da, goes to (2, 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shared.bilevel import Bilevel, BilevelConfig, Forward


class ToyModel(nn.Module):
    """Two scalars: the weight `w` and the architecture parameter `alpha`."""

    def __init__(self, alpha: float = 2.0, w: float = -2.0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=dtype))
        self.alpha = nn.Parameter(torch.tensor(alpha, dtype=dtype))

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.w, self.alpha


def valid_loss(forward: Forward) -> Tensor:
    w, a = forward()
    return a * w - 2 * a + 1


def train_loss(forward: Forward) -> Tensor:
    w, a = forward()
    return w ** 2 - 2 * a * w + a ** 2


def fixed_point(order: str, xi: float) -> float:
    """The closed-form limit of alpha (and w) for an order and weight learning rate xi in (0, 1)."""
    return 2.0 if order == "first" else 2.0 / (1.0 + 2.0 * xi)


@dataclass(frozen=True)
class ToyResult:
    alpha: float
    w: float
    path: tuple[tuple[float, float], ...]  # (alpha, w) after every step


def solve(order: str, xi: float, steps: int, arch_lr: float) -> ToyResult:
    """Alternate architecture steps (plain SGD, lr `arch_lr`) and plain-SGD weight steps (lr `xi`)."""
    model = ToyModel()
    weight_opt = torch.optim.SGD([model.w], lr=xi)
    arch_opt = torch.optim.SGD([model.alpha], lr=arch_lr)
    engine = Bilevel(model, weight_opt, arch_opt, BilevelConfig(order=order))
    path = []
    for _ in range(steps):
        engine.arch_step(train_loss, valid_loss)
        engine.weight_step(train_loss)
        path.append((model.alpha.item(), model.w.item()))
    return ToyResult(alpha=path[-1][0], w=path[-1][1], path=tuple(path))
