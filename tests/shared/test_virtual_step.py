"""The differentiated weight step: u = -(dw'/dg)^T v against closed forms, and the optimizers it refuses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.bilevel import Bilevel, BilevelConfig
from shared.errors import ConfigError
from shared.virtual_step import unrolled_step


def _optimizer(steps: int, **options) -> tuple[torch.optim.SGD, list[torch.Tensor], list[torch.Tensor]]:
    """An SGD over two float64 parameters after `steps` real steps, a gradient and a vector v."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), nn.Parameter(torch.randn(5, dtype=torch.float64))]
    opt = torch.optim.SGD(params, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]


@pytest.mark.parametrize("steps", [0, 2], ids=["first-step", "with-buffer"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_sgd_pullback_is_the_closed_form_factor(steps: int, nesterov: bool, max_norm: float | None) -> None:
    """dw'/dg = -lr * c * k with k = d buf/dg for plain momentum: 1 while the buffer is empty (torch starts it at the
    gradient itself), 1 - dampening after; nesterov steps along g + mu * buf, so k = 1 + mu * d buf/dg."""
    lr, mu, damp = 0.1, 0.9, 0.0 if nesterov else 0.3  # torch allows dampening only without nesterov
    opt, grads, v = _optimizer(steps, lr=lr, momentum=mu, dampening=damp, nesterov=nesterov, weight_decay=1e-2)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    c = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    assert max_norm is None or c < 0.5  # the clip is active
    k = 1.0 if steps == 0 else 1 - damp  # d buf / d g
    k = 1 + mu * k if nesterov else k  # nesterov steps along g + mu * buf
    _, pullback = unrolled_step(opt, grads, max_norm)
    for u, vi in zip(pullback(v), v):
        torch.testing.assert_close(u, lr * c * k * vi, rtol=1e-12, atol=0)


def test_adam_pullback_at_the_first_step_is_the_closed_form() -> None:
    """With empty moments, w' = w - lr * g / (|g| + eps) (the bias corrections cancel), so
    dw'/dg = -lr * eps / (|g| + eps)^2."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = torch.optim.Adam([param], lr=0.01, eps=1e-3)
    g, v = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w_prime, pullback = unrolled_step(opt, [g], None)
    torch.testing.assert_close(w_prime[0], param.detach() - 0.01 * g / (g.abs() + 1e-3), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pullback([v])[0], 0.01 * 1e-3 / (g.abs() + 1e-3) ** 2 * v, rtol=1e-9, atol=0)


def test_a_parameter_without_gradient_history_gets_a_finite_adam_pullback() -> None:
    """A zero gradient on empty moments (an embedding row no word of the batch used): sqrt's derivative at 0 must
    not turn u into NaN."""
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([param], lr=0.01)
    _, pullback = unrolled_step(opt, [torch.tensor([0.0, 1.0, -1.0])], None)
    assert torch.isfinite(pullback([torch.ones(3)])[0]).all()


@pytest.mark.parametrize("order", ["second", "exact"])
def test_an_optimizer_whose_step_is_not_written_out_is_refused_in_one_line(order: str) -> None:
    model = nn.Linear(2, 2)
    arch = torch.optim.Adam([model.bias], lr=1e-3)
    supported = r"torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW .*RMSprop.*order=first"
    with pytest.raises(ConfigError, match=supported) as error:
        Bilevel(model, torch.optim.RMSprop([model.weight], lr=0.1), arch, BilevelConfig(order=order))
    assert "\n" not in str(error.value)
    Bilevel(model, torch.optim.RMSprop([model.weight], lr=0.1), arch, BilevelConfig(order="first"))  # no step taken
