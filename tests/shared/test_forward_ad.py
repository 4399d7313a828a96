"""The exact order's product in reverse-over-forward mode against double backward, in float64: per operator the
supernets and their losses use (those torch cannot differentiate again in forward mode among them), and per
supernet."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.forward_ad import directional_derivative

D = torch.float64
torch.manual_seed(0)
X = torch.randn(8, 4, 6, 6, dtype=D)
W = torch.randn(4, 4, 3, 3, dtype=D)
U = torch.randn(4, 4, 3, 3, dtype=D)
STATS = torch.arange(4, dtype=D), torch.arange(4, dtype=D) + 1
MASK = (torch.rand(8, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=D) > 0.5).to(D)
TARGET = torch.arange(8) % 4

# h (8, 4, 6, 6) depends on the weights W and on alpha (4,) (not as a per-channel affine map, which BatchNorm would
# remove); each op is applied to it before a smooth loss.
OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "batch_norm": lambda h, a: F.batch_norm(h, None, None, training=True),
    "batch_norm-running": lambda h, a: F.batch_norm(h, STATS[0].clone(), STATS[1].clone(), training=True),
    "batch_norm-affine": lambda h, a: F.batch_norm(h, None, None, weight=a, bias=2 * a, training=True),
    "batch_norm-eval": lambda h, a: F.batch_norm(h, *STATS, weight=a, training=False),
    "BatchNorm2d": lambda h, a: torch.nn.BatchNorm2d(4, affine=False).to(D)(h),
    "layer_norm": lambda h, a: F.layer_norm(h, [6, 6]) * a.view(1, -1, 1, 1),
    "softmax": lambda h, a: F.softmax(h, 1),
    "Tensor.softmax": lambda h, a: h.softmax(1),
    "log_softmax": lambda h, a: torch.log_softmax(h, 1),
    "cross_entropy": lambda h, a: F.cross_entropy(h.mean((2, 3)), TARGET).expand(1),
    "lerp": lambda h, a: torch.lerp(h, h.tanh(), h.sigmoid()),
    "mul-plain": lambda h, a: h * MASK,
    "mul-scalar": lambda h, a: 0.5 * h - 2.0 / (h.square() + 1.0),
    "conv-relu-pools": lambda h, a: F.max_pool2d(F.relu(F.conv2d(h, W, padding=1)), 3, 1, 1)
    + F.avg_pool2d(h, 3, 1, 1, count_include_pad=False),
    "matmul-cat-stack": lambda h, a: torch.cat([h @ h, torch.stack([h, h.tanh()]).sum(0)], 1),
}


def _loss(weights: Tensor, alpha: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    h = F.conv2d(X, weights, padding=1) + X * alpha.view(1, -1, 1, 1)  # no per-channel scale: BN keeps alpha
    return (op(h, alpha).sin() ** 2).mean()


def _double_backward(loss: Callable[[Tensor], Tensor], weights: Tensor, tangent: Tensor,
                     alphas: list[Tensor]) -> list[Tensor]:
    w = weights.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss(w), w, create_graph=True)
    return list(torch.autograd.grad((g * tangent).sum(), alphas, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("name", OPS)
def test_mixed_product_equals_double_backward(name: str) -> None:
    alpha = torch.randn(4, dtype=D, requires_grad=True)
    loss = lambda w: _loss(w, alpha, OPS[name])  # noqa: E731
    reference = _double_backward(loss, W, U, [alpha])[0]
    slope = directional_derivative(lambda weights: loss(weights["w"]), {"w": W}, [U])
    product = torch.autograd.grad(slope, alpha)[0]
    assert torch.allclose(product, reference, rtol=1e-8, atol=1e-12 * reference.abs().max().item())


def test_slope_is_the_directional_derivative() -> None:
    alpha = torch.randn(4, dtype=D)
    loss = lambda w: _loss(w, alpha, OPS["batch_norm"])  # noqa: E731
    slope = directional_derivative(lambda weights: loss(weights["w"]), {"w": W}, [U])
    h = 1e-6
    assert slope.item() == pytest.approx(((loss(W + h * U) - loss(W - h * U)) / (2 * h)).item(), rel=1e-6)


def test_running_statistics_move_as_torch_moves_them() -> None:
    mean, var = STATS[0].clone(), STATS[1].clone()
    F.batch_norm(X, mean, var, training=True, momentum=0.3)
    ours_mean, ours_var = STATS[0].clone(), STATS[1].clone()
    directional_derivative(lambda w: F.batch_norm(w["x"], ours_mean, ours_var, training=True, momentum=0.3).sum(),
                           {"x": X}, [torch.ones_like(X)])
    assert torch.allclose(ours_mean, mean) and torch.allclose(ours_var, var)


def test_instance_norm_is_refused_in_one_line() -> None:
    with pytest.raises(NotImplementedError, match="order=second"):
        directional_derivative(lambda w: F.instance_norm(w["x"]).sum(), {"x": X}, [X])


# ---- the two supernets, float64, through the engine's own passes ---------------------------------------------------
def _task(task_name: str) -> tuple[object, Callable[[], Tensor]]:
    """A tiny search task in float64 and its training loss (dropout on for the RNN)."""
    torch.manual_seed(0)
    if task_name == "rnn":
        from rnn_darts.data import synthetic_corpus
        from rnn_darts.search import RNNSearchTask, SearchConfig
        from rnn_darts.supernet import SupernetConfig

        model = SupernetConfig(ntoken=50, ninp=8, nhid=8, steps=3)
        task = RNNSearchTask(synthetic_corpus(50, tokens=200, seed=0), model,
                             SearchConfig(order="exact", batch_size=4, eval_batch_size=4), torch.device("cpu"), seed=0)
        task.model.double()
        x, y = (torch.randint(50, (5, 4)) for _ in range(2))
        return task, task.loss(x, y, task.model.init_hidden(4), True)
    from cnn_darts.data import synthetic_images
    from cnn_darts.search import CNNSearchTask, SearchConfig
    from cnn_darts.supernet import SupernetConfig

    model = SupernetConfig(C=4, layers=3, steps=2, multiplier=2)
    task = CNNSearchTask(synthetic_images(train=16, test=4, seed=0), model, SearchConfig(order="exact", batch_size=4),
                         torch.device("cpu"), seed=0)
    task.model.double()
    return task, task.loss(torch.randn(4, 3, 32, 32, dtype=D), torch.arange(4))


@pytest.mark.parametrize("task_name", ["rnn", "cnn"])
def test_supernet_exact_product_equals_double_backward(task_name: str) -> None:
    task, train_loss = _task(task_name)
    engine = task.engine
    engine.model.train()
    alphas = [a for _, a in engine.alphas]
    weights = dict(engine.weights)
    u = [torch.randn_like(p) for p in weights.values()]

    def at(w: dict[str, Tensor]) -> Tensor:
        torch.manual_seed(5)  # the same dropout masks in every pass
        return train_loss(engine.forward_with(w, dict(engine.alphas)))

    w = {n: p.detach().requires_grad_() for n, p in weights.items()}
    grads = torch.autograd.grad(at(w), list(w.values()), create_graph=True, allow_unused=True,
                                materialize_grads=True)
    reference = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, u)), alphas)
    product = torch.autograd.grad(directional_derivative(at, weights, u), alphas)
    for p, r in zip(product, reference):
        assert torch.allclose(p, r, rtol=1e-7, atol=1e-10 * r.abs().max().item())
