"""The bilevel engine against closed forms, a float64 autograd reference, and the real optimizer."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from shared.bilevel import Bilevel, BilevelConfig
from shared.errors import ConfigError
from shared.toy import fixed_point, solve
from shared.virtual_step import unrolled_step


# ---- the paper's toy problem --------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["first", "second", "exact"])
@pytest.mark.parametrize("xi", [0.2, 0.5, 0.7])
def test_toy_fixed_points(order: str, xi: float) -> None:
    result = solve(order, xi=xi, steps=400, arch_lr=0.1)
    expected = fixed_point(order, xi)
    assert result.alpha == pytest.approx(expected, abs=1e-3)
    assert result.w == pytest.approx(expected, abs=1e-3)


def test_toy_second_order_reaches_true_optimum_at_half() -> None:
    assert solve("second", xi=0.5, steps=400, arch_lr=0.1).alpha == pytest.approx(1.0, abs=1e-3)


# ---- a small smooth model with dropout and BatchNorm ----------------------------------------------------------------
class MixedNet(nn.Module):
    """x -> linear -> softmax(alpha)-weighted activations -> dropout -> BatchNorm -> linear."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.out = nn.Linear(6, 2)
        self.drop = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(6) if batchnorm else nn.Identity()
        self.alphas = nn.Parameter(0.5 * torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        weights = torch.softmax(self.alphas, dim=0)
        h = weights[0] * torch.tanh(h) + weights[1] * torch.sigmoid(h) + weights[2] * nn.functional.softplus(h)
        return self.out(self.norm(self.drop(h)))


Factory = Callable[[MixedNet], torch.optim.Optimizer]


def _sgd(model: MixedNet) -> torch.optim.Optimizer:
    return torch.optim.SGD(_weights(model), lr=0.3, momentum=0.9, weight_decay=1e-2)


def _weights(model: MixedNet) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n != "alphas"]


def _setup(batchnorm: bool = False, clip: float | None = None, order: str = "second",
           dtype: torch.dtype = torch.float64, factory: Factory = _sgd, fd_radius: float = 0.01):
    torch.manual_seed(0)
    model = MixedNet(batchnorm).to(dtype)
    w_opt = factory(model)
    a_opt = torch.optim.Adam([model.alphas], lr=3e-3)
    data = {k: (torch.randn(8, 3, dtype=dtype), torch.randn(8, 2, dtype=dtype)) for k in ("train", "valid")}

    def loss_on(split: str):
        x, y = data[split]
        return lambda forward: ((forward(x) - y) ** 2).mean()

    engine = Bilevel(model, w_opt, a_opt, BilevelConfig(order=order, grad_clip=clip, fd_radius=fd_radius))
    for _ in range(3):  # fill the momentum buffers, so the virtual step has real optimizer state to honour
        engine.weight_step(loss_on("train"))
    return model, engine, loss_on


def _reference_hypergradient(model: MixedNet, engine: Bilevel, loss_on, clip: float | None = None) -> Tensor:
    """d/dalpha L_val(w'(alpha), alpha) by plain autograd through the whole unrolled objective: g(alpha) with
    create_graph, clipped by a constant factor, then stepped by torch's own optimizer with differentiable=True over
    non-leaf copies of the weights and a copy of the real optimizer's state (independent of the engine's step)."""
    opt = engine.weight_optimizer
    names = [n for n, _ in engine.weights]
    alpha = model.alphas
    w = {n: p.detach().requires_grad_() for n, p in engine.weights}
    loss = loss_on("train")(lambda x: functional_call(model, {**w, "alphas": alpha}, (x,)))
    grads = torch.autograd.grad(loss, list(w.values()), create_graph=True, allow_unused=True, materialize_grads=True)
    coef = 1.0
    if clip is not None:
        norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
        coef = min(1.0, clip / (norm.item() + 1e-6))
    copies, it = [t.clone() for t in w.values()], iter(range(len(names)))
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [copies[next(it)] for _ in group["params"]]} for group in opt.param_groups]
    twin = type(opt)(groups, differentiable=True)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in twin.param_groups:  # loading the state brought the real groups' flags back
        group.update(differentiable=True, foreach=False)
    for state in twin.state.values():  # Adam's differentiable path takes its bias corrections in the step's dtype
        if "step" in state:
            state["step"] = state["step"].to(torch.float64)
    for c, g in zip(copies, grads):
        c.grad = coef * g
    twin.step()
    loss_val = loss_on("valid")(lambda x: functional_call(model, {**dict(zip(names, copies)), "alphas": alpha}, (x,)))
    return torch.autograd.grad(loss_val, alpha)[0]


def _engine_gradient(engine: Bilevel, loss_on, seed: int) -> Tensor:
    torch.manual_seed(seed)
    return engine.hypergradient(loss_on("train"), loss_on("valid")).grads[0]


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_finite_difference_and_exact_match_autograd_reference_with_dropout() -> None:
    model, engine, loss_on = _setup()
    torch.manual_seed(11)
    reference = _reference_hypergradient(model, engine, loss_on)
    fd = _engine_gradient(engine, loss_on, seed=11)
    exact = Bilevel(model, engine.weight_optimizer, engine.arch_optimizer, BilevelConfig(order="exact"))
    ex = _engine_gradient(exact, loss_on, seed=11)
    assert _relative_error(fd, reference) < 1e-3
    assert _relative_error(ex, reference) < 1e-3
    assert _relative_error(fd, ex) < 1e-3
    first = Bilevel(model, engine.weight_optimizer, engine.arch_optimizer, BilevelConfig(order="first"))
    assert _relative_error(_engine_gradient(first, loss_on, seed=11), reference) > 1e-2  # the test can tell orders


# Weight optimizers the engine differentiates, with the options that change dw'/dg; a group each for the input and
# the output layer where two groups are named.
OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda m: torch.optim.SGD(_weights(m), lr=0.3),
    "sgd-momentum-decay": _sgd,
    "sgd-dampening": lambda m: torch.optim.SGD(_weights(m), lr=0.3, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "sgd-nesterov": lambda m: torch.optim.SGD(_weights(m), lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-2),
    "sgd-two-groups": lambda m: torch.optim.SGD([
        {"params": list(m.inp.parameters()), "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-2},
        {"params": list(m.out.parameters()), "lr": 0.05, "momentum": 0.5, "nesterov": True}]),
    "adam": lambda m: torch.optim.Adam(_weights(m), lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad-two-groups": lambda m: torch.optim.AdamW([
        {"params": list(m.inp.parameters()), "lr": 1e-2, "amsgrad": True},
        {"params": list(m.out.parameters()), "lr": 3e-2, "betas": (0.5, 0.9), "weight_decay": 0.1}]),
}
ACTIVE_CLIP = 0.02  # the setup's training gradient has norm ~0.5-2: clipped by a factor of 0.01-0.05


@pytest.mark.parametrize("order, fd_radius, tolerance", [("second", 1e-5, 1e-6), ("exact", 0.01, 1e-9)])
@pytest.mark.parametrize("clip", [None, 1e3, ACTIVE_CLIP], ids=["no-clip", "clip-inactive", "clip-active"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hypergradient_equals_autograd_through_the_unrolled_step(name: str, clip: float | None, order: str,
                                                                 fd_radius: float, tolerance: float) -> None:
    """Float64, dropout on: the engine's second (finite difference) and exact orders against autograd through
    L_val(step(w, c * g(alpha)), alpha), the clip factor c constant, for every optimizer option above."""
    model, engine, loss_on = _setup(clip=clip, order=order, factory=OPTIMIZERS[name], fd_radius=fd_radius)
    torch.manual_seed(11)
    reference = _reference_hypergradient(model, engine, loss_on, clip)
    assert _relative_error(_engine_gradient(engine, loss_on, seed=11), reference) < tolerance
    first = Bilevel(model, engine.weight_optimizer, engine.arch_optimizer, BilevelConfig(order="first"))
    assert _relative_error(_engine_gradient(first, loss_on, seed=11), reference) > 1e-3  # the orders differ here


@pytest.mark.parametrize("clip", [None, ACTIVE_CLIP], ids=["no-clip", "clip-active"])
def test_exact_order_through_batchnorm_equals_autograd(clip: float | None) -> None:
    """BatchNorm's batch statistics depend on the weights, and the exact product must differentiate them (a forward-mode
    product through torch's batch_norm formula did not: see benchmarks/README.md)."""
    model, engine, loss_on = _setup(batchnorm=True, clip=clip, order="exact")
    torch.manual_seed(11)
    reference = _reference_hypergradient(model, engine, loss_on, clip)
    assert _relative_error(_engine_gradient(engine, loss_on, seed=11), reference) < 1e-9


def test_the_active_clip_shrinks_the_unrolled_term() -> None:
    """The clip-active cases above clip hard, and then the second-order term is far from the unclipped one."""
    model, engine, loss_on = _setup(clip=ACTIVE_CLIP)
    torch.manual_seed(11)
    grads = torch.autograd.grad(loss_on("train")(model), [p for _, p in engine.weights])
    assert ACTIVE_CLIP / torch.sqrt(sum((g ** 2).sum() for g in grads)) < 0.1
    first = Bilevel(model, engine.weight_optimizer, engine.arch_optimizer, BilevelConfig(order="first"))
    term_clipped = _engine_gradient(engine, loss_on, seed=11) - _engine_gradient(first, loss_on, seed=11)
    unclipped = Bilevel(model, engine.weight_optimizer, engine.arch_optimizer, BilevelConfig(order="exact"))
    term_unclipped = _engine_gradient(unclipped, loss_on, seed=11) - _engine_gradient(first, loss_on, seed=11)
    assert term_clipped.norm() < 0.2 * term_unclipped.norm()


def test_second_order_sees_the_same_dropout_masks_in_both_shifted_passes(monkeypatch) -> None:
    """Without the replay, the +-eps passes draw different masks and the difference quotient is noise."""
    model, engine, loss_on = _setup()
    torch.manual_seed(5)
    reference = _reference_hypergradient(model, engine, loss_on)
    import shared.bilevel as bilevel

    class NoReplay(bilevel._RandomReplay):
        def replay(self):  # type: ignore[override]
            from contextlib import nullcontext
            return nullcontext()

    monkeypatch.setattr(bilevel, "_RandomReplay", NoReplay)
    assert _relative_error(_engine_gradient(engine, loss_on, seed=5), reference) > 1e-2


@pytest.mark.parametrize("order", ["first", "second", "exact"])
def test_arch_step_leaves_weights_buffers_and_optimizer_state_bit_identical(order: str) -> None:
    model, engine, loss_on = _setup(batchnorm=True, clip=0.5, order=order, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "alphas"}
    opt_state = copy.deepcopy(engine.weight_optimizer.state_dict())
    alphas = model.alphas.detach().clone()
    grads = [p.grad.clone() for _, p in engine.weights]  # left by the warm-up weight steps
    engine.arch_step(loss_on("train"), loss_on("valid"))
    after = model.state_dict()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    new_opt = engine.weight_optimizer.state_dict()
    for index, entry in opt_state["state"].items():
        assert torch.equal(new_opt["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    assert not torch.equal(model.alphas.detach(), alphas)  # the architecture did move
    assert all(torch.equal(p.grad, g) for (_, p), g in zip(engine.weights, grads))


def test_plain_order_takes_no_architecture_step_and_evaluates_nothing() -> None:
    model, engine, _ = _setup(order="plain")
    alphas = model.alphas.detach().clone()
    untouchable = lambda forward: pytest.fail("plain evaluated a loss")  # noqa: E731
    assert engine.arch_step(untouchable, untouchable) is None
    assert torch.equal(model.alphas.detach(), alphas) and model.alphas.grad is None
    with pytest.raises(ValueError, match="plain"):
        engine.hypergradient(untouchable, untouchable)


def test_first_order_builds_no_weight_gradients() -> None:
    model, engine, loss_on = _setup(order="first")
    engine.weight_optimizer.zero_grad(set_to_none=True)
    grad = _engine_gradient(engine, loss_on, seed=3)
    assert all(p.grad is None for _, p in engine.weights)
    torch.manual_seed(3)
    expected = torch.autograd.grad(loss_on("valid")(model), model.alphas)[0]
    assert torch.allclose(grad, expected)


# ---- the virtual step is the real step ----------------------------------------------------------------------------
def _load_grads(params: list[Tensor], grads: list[Tensor], clip: float | None) -> None:
    """What a training loop does before `optimizer.step()`: set the gradients, clip them."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)


@pytest.mark.parametrize("factory", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=3e-4),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=20.0, weight_decay=5e-7),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, maximize=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.5, 0.9)),
], ids=["sgd-momentum", "sgd-dampening", "sgd-nesterov", "sgd-plain", "sgd-maximize", "adam", "adam-amsgrad-maximize",
        "adamw"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_virtual_step_equals_real_optimizer_step(factory, clip) -> None:
    torch.manual_seed(1)
    model = MixedNet()
    shapes = [p.shape for n, p in model.named_parameters() if n != "alphas"]
    warm = [[torch.randn(s) for s in shapes] for _ in range(3)]
    grads = [torch.randn(s) for s in shapes]
    params = [p for n, p in model.named_parameters() if n != "alphas"]
    opt = factory(params)
    for warm_grads in warm:  # real steps first, so momentum / Adam moments are part of the state
        _load_grads(params, warm_grads, clip)
        opt.step()
    before = [p.detach().clone() for p in params]
    virtual = unrolled_step(opt, grads, clip)[0]
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # nothing moved
    _load_grads(params, grads, clip)
    opt.step()
    for v, p in zip(virtual, params):
        torch.testing.assert_close(v, p.detach(), rtol=1e-6, atol=1e-7)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="order must be one of"):
        BilevelConfig(order="third")
    with pytest.raises(ConfigError, match="grad_clip"):
        BilevelConfig(grad_clip=0.0)


def test_parameter_in_both_optimizers_is_rejected() -> None:
    model = MixedNet()
    with pytest.raises(ConfigError, match="both"):
        Bilevel(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([model.alphas], lr=0.1),
                BilevelConfig())
