"""The weight optimizer's step as a pure function of the gradient, for the unrolled (second-order) architecture step.

The architecture gradient differentiates L_val(w'(alpha), alpha) through one step of the real weight optimizer,

    w' = step(w, c * g(alpha); state)      g = grad_w L_train(w, alpha),  c = min(1, grad_clip / ||g||)
    dL_val/dalpha = grad_alpha L_val(w', alpha) - H_{alpha w} u,   u = -(dw'/dg)^T v,   v = grad_w' L_val(w', alpha)

with the clip factor c held constant (not differentiated). Each supported optimizer's update is written
out of place here, from torch's own update rule, so its values equal `optimizer.step()` and autograd gives u as a
vector-Jacobian product: clipping, momentum, dampening, nesterov, weight decay, maximize, Adam's moments and
several parameter groups all enter u without a per-case factor. For plain SGD u = lr * c * v.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vjp

from shared.errors import ConfigError

StepFn = Callable[[torch.optim.Optimizer, list[Tensor]], list[Tensor]]


def clip_coefficient(grads: Sequence[Tensor], max_norm: float | None) -> Tensor | float:
    """The factor `torch.nn.utils.clip_grad_norm_` would scale these gradients by."""
    if max_norm is None:
        return 1.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _sgd(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> list[Tensor]:
    """torch.optim.SGD: weight decay, momentum (the first step's buffer is the gradient itself), dampening,
    nesterov, maximize."""
    out, grads_iter = [], iter(grads)
    for group in optimizer.param_groups:
        mu, damp, decay = group["momentum"], group["dampening"], group["weight_decay"]
        for p in group["params"]:
            w, d = p.detach(), next(grads_iter)
            d = -d if group["maximize"] else d
            if decay:
                d = d + decay * w
            if mu:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                buf = d if buf is None else mu * buf + (1 - damp) * d
                d = d + mu * buf if group["nesterov"] else buf
            out.append(w - group["lr"] * d)
    return out


def _adam(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> list[Tensor]:
    """torch.optim.Adam and AdamW: L2 or decoupled weight decay, bias corrections, amsgrad, maximize."""
    out, grads_iter = [], iter(grads)
    for group in optimizer.param_groups:
        (beta1, beta2), lr, decay, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            w, d, state = p.detach(), next(grads_iter), optimizer.state.get(p, {})
            d = -d if group["maximize"] else d
            step = float(state.get("step", 0)) + 1
            if decay and group["decoupled_weight_decay"]:
                w = w * (1 - lr * decay)
            elif decay:
                d = d + decay * w
            m = torch.lerp(state.get("exp_avg", torch.zeros_like(w)), d, 1 - beta1)
            s = beta2 * state.get("exp_avg_sq", torch.zeros_like(w)) + (1 - beta2) * d * d
            if group["amsgrad"]:
                s = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(w)), s)
            # sqrt's derivative is infinite at 0 (an entry whose gradient and history are both 0): take 0 there
            # through the clamp, as its one-sided limits disagree; the value moves by sqrt(tiny), far below eps.
            denom = s.clamp_min(torch.finfo(s.dtype).tiny).sqrt() / (1 - beta2 ** step) ** 0.5 + eps
            out.append(w - lr / (1 - beta1 ** step) * m / denom)
    return out


STEPS: dict[type[torch.optim.Optimizer], StepFn] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
}


def check_differentiable(optimizer: torch.optim.Optimizer) -> None:
    """A one-line ConfigError unless the engine can differentiate this optimizer's step."""
    if type(optimizer) not in STEPS:
        names = ", ".join(f"torch.optim.{t.__name__}" for t in STEPS)
        raise ConfigError(f"the second-order and exact architecture steps differentiate the weight optimizer's step, "
                          f"which is written out for {names} only, not {type(optimizer).__name__}: use one of "
                          f"those or order=first")


def unrolled_step(optimizer: torch.optim.Optimizer, grads: Sequence[Tensor], max_norm: float | None
                  ) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Tensor]]]:
    """The weights w' one real step would produce from `grads` (clipped like the real step), out of place, and
    the map v -> u = -(dw'/dg)^T v at these gradients, the clip factor held constant."""
    check_differentiable(optimizer)
    step, grads = STEPS[type(optimizer)], [g.detach() for g in grads]
    coef = clip_coefficient(grads, max_norm)  # a constant of the step: computed outside the differentiated function
    w_prime, pullback = vjp(lambda g: step(optimizer, [coef * gi for gi in g]), grads)
    return [w.detach() for w in w_prime], lambda v: [-ui for ui in pullback(list(v))[0]]
