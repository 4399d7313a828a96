"""The bilevel engine against closed forms, a float64 autograd reference, and the real optimizer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from shared.bilevel import Bilevel, BilevelConfig
from shared.errors import ConfigError
from shared.toy import fixed_point, solve


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


def _setup(batchnorm: bool = False, momentum: float = 0.9, decay: float = 1e-2, clip: float | None = None,
           order: str = "second", dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = MixedNet(batchnorm).to(dtype)
    weights = [p for n, p in model.named_parameters() if n != "alphas"]
    w_opt = torch.optim.SGD(weights, lr=0.3, momentum=momentum, weight_decay=decay)
    a_opt = torch.optim.Adam([model.alphas], lr=3e-3)
    data = {k: (torch.randn(8, 3, dtype=dtype), torch.randn(8, 2, dtype=dtype)) for k in ("train", "valid")}

    def loss_on(split: str):
        x, y = data[split]
        return lambda forward: ((forward(x) - y) ** 2).mean()

    engine = Bilevel(model, w_opt, a_opt, BilevelConfig(order=order, grad_clip=clip))
    for _ in range(3):  # fill the momentum buffers, so the virtual step has real optimizer state to honour
        engine.weight_step(loss_on("train"))
    return model, engine, loss_on


def _reference_hypergradient(model: MixedNet, engine: Bilevel, loss_on) -> Tensor:
    """d/dalpha L_val(w'(alpha), alpha), w' = SGD step with momentum and decay, by plain autograd (create_graph)."""
    opt = engine.weight_optimizer
    group = opt.param_groups[0]
    names = [n for n, _ in engine.weights]
    params = [p for _, p in engine.weights]
    alpha = model.alphas
    w = {n: p.detach().requires_grad_() for n, p in zip(names, params)}
    loss = loss_on("train")(lambda x: functional_call(model, {**w, "alphas": alpha}, (x,)))
    grads = torch.autograd.grad(loss, list(w.values()), create_graph=True, allow_unused=True, materialize_grads=True)
    w_prime = {}
    for n, p, g in zip(names, params, grads):
        d = g + group["weight_decay"] * p.detach()
        buf = opt.state[p]["momentum_buffer"]
        w_prime[n] = p.detach() - group["lr"] * (group["momentum"] * buf + d)
    loss_val = loss_on("valid")(lambda x: functional_call(model, {**w_prime, "alphas": alpha}, (x,)))
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
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
], ids=["sgd-momentum", "sgd-dampening", "sgd-nesterov", "sgd-plain", "adam-generic"])
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
    engine = Bilevel(model, opt, torch.optim.SGD([model.alphas], lr=1.0), BilevelConfig(grad_clip=clip))
    before = [p.detach().clone() for p in params]
    virtual = engine.virtual_step(grads)
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
