"""The search supernet: shapes, the alpha/weight split, genotype parsing, the skipped 'none' op and functional_call."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from cnn_darts.ops import DilatedDepthwiseConv2d
from cnn_darts.supernet import MixedOp, SearchCell, Supernet, SupernetConfig, parse_edges
from shared.errors import ConfigError
from shared.genotypes import CNN_PRIMITIVES, CNNGenotype, published

TINY = SupernetConfig(C=4, layers=3)


def tiny_net(config: SupernetConfig = TINY, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    return Supernet(config)


def images(batch: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def edge_index(node: int, source: int) -> int:
    """Row of the alphas for the edge source -> node (nodes 0-based): node i's edges follow 2 + 3 + ... earlier."""
    return sum(2 + i for i in range(node)) + source


@pytest.mark.parametrize(("layers", "size"), [(3, 8), (5, 16)])
def test_forward_backward_shapes_and_every_parameter_gets_a_gradient(layers: int, size: int) -> None:
    model = tiny_net(SupernetConfig(C=4, layers=layers))
    logits = model(images(size=size))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.alphas_normal.grad.abs().sum() > 0 and model.alphas_reduce.grad.abs().sum() > 0


def test_cells_reduce_at_a_third_and_two_thirds() -> None:
    model = tiny_net(SupernetConfig(C=4, layers=8))
    assert [cell.reduction for cell in model.cells] == [False, False, True, False, False, True, False, False]
    assert all(len(cell.edges) == 14 for cell in model.cells if isinstance(cell, SearchCell))
    assert model.classifier.in_features == 4 * 4 * 4  # multiplier * C doubled twice


def test_alphas_are_registered_parameters_in_the_state_dict() -> None:
    model = tiny_net()
    state = model.state_dict()
    for name in ("alphas_normal", "alphas_reduce"):
        assert state[name].shape == (14, len(CNN_PRIMITIVES))
        assert getattr(model, name).abs().max() < 0.01  # initialised at 1e-3 * randn
    assert sum(p.numel() for p in model.arch_parameters()) == 2 * 14 * 8


def test_arch_and_weight_parameters_cover_every_parameter_once() -> None:
    model = tiny_net()
    arch = {id(p) for p in model.arch_parameters()}
    weights = {id(p) for p in model.weight_parameters()}
    assert not arch & weights
    assert arch | weights == {id(p) for p in model.parameters()}
    assert len(model.arch_parameters()) + len(model.weight_parameters()) == len(list(model.parameters()))
    assert [name for name, _ in model.named_arch_parameters()] == ["alphas_normal", "alphas_reduce"]


def test_alpha_softmax_is_detached_and_normalised() -> None:
    probs = tiny_net().alpha_softmax()
    for p in probs.values():
        assert not p.requires_grad
        assert torch.allclose(p.sum(-1), torch.ones(14))


def test_genotype_of_a_fresh_supernet_is_valid() -> None:
    genotype = tiny_net().genotype()
    assert isinstance(genotype, CNNGenotype)
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3, 4, 5)
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)


def alphas_for(edges: tuple[tuple[str, int], ...], none_elsewhere: float) -> torch.Tensor:
    """Alphas that make `edges` the chosen ones, the first of each node strongest; 'none' dominant on other edges."""
    alphas = torch.zeros(14, len(CNN_PRIMITIVES))
    alphas[:, CNN_PRIMITIVES.index("none")] = none_elsewhere
    for k, (op, source) in enumerate(edges):
        row = edge_index(k // 2, source)
        alphas[row, CNN_PRIMITIVES.index("none")] = 0.0
        alphas[row, CNN_PRIMITIVES.index(op)] = 4.0 if k % 2 == 0 else 3.0
    return alphas


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_genotype_picks_the_edges_and_ops_set_by_hand(name: str) -> None:
    expected = published("cnn", name)
    model = tiny_net()
    with torch.no_grad():
        model.alphas_normal.copy_(alphas_for(expected.normal, none_elsewhere=6.0))
        model.alphas_reduce.copy_(alphas_for(expected.reduce, none_elsewhere=6.0))
    assert model.genotype() == expected


def test_parse_edges_ignores_none_even_when_it_dominates() -> None:
    # steps=2: node 0 has edges 0, 1; node 1 has edges 2, 3, 4. 'none' (column 0) is the largest everywhere.
    primitives = ("none", "max_pool_3x3", "sep_conv_3x3")
    weights = torch.tensor([
        [0.90, 0.02, 0.08],  # 0 -> node 0: sep_conv_3x3 at 0.08
        [0.80, 0.15, 0.05],  # 1 -> node 0: max_pool_3x3 at 0.15 (stronger, listed first)
        [0.97, 0.01, 0.02],  # 0 -> node 1: weakest
        [0.70, 0.20, 0.10],  # 1 -> node 1: max_pool_3x3 at 0.20
        [0.60, 0.10, 0.30],  # node 0 -> node 1: sep_conv_3x3 at 0.30 (strongest)
    ])
    assert parse_edges(weights, primitives, steps=2) == (
        ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 2), ("max_pool_3x3", 1))


def reference_mixed_forward(self: MixedOp, x: torch.Tensor, weights: torch.Tensor,
                            relu_x: torch.Tensor | None = None) -> torch.Tensor:
    """The original code's weighted sum over every op, the Zero op included, each op applying its own ReLU."""
    return sum(w * op(x) for w, op in zip(weights, self.ops))


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_skipping_none_matches_the_full_weighted_sum(stride: int) -> None:
    torch.manual_seed(0)
    mixed = MixedOp(4, stride, CNN_PRIMITIVES)
    x = torch.randn(2, 4, 8, 8)
    alpha = torch.randn(len(CNN_PRIMITIVES), requires_grad=True)
    grad_out = torch.randn(2, 4, 8 // stride, 8 // stride)
    out = mixed(x, F.softmax(alpha, -1), F.relu(x))
    ref = reference_mixed_forward(mixed, x, F.softmax(alpha, -1))
    assert torch.allclose(out, ref, atol=1e-6)
    (grad,) = torch.autograd.grad(out, alpha, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, alpha, grad_out)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert grad[CNN_PRIMITIVES.index("none")] != 0  # alpha_none still learns through the softmax


def logits_and_arch_derivatives(model: Supernet, x: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits, dL/dalpha and the mixed second derivative d/dalpha (dL/dw . v) that the exact bilevel step needs."""
    loss = F.cross_entropy(model(x), torch.tensor([3, 5]))
    arch, weights = model.arch_parameters(), model.weight_parameters()
    grads = torch.autograd.grad(loss, arch + weights, create_graph=True)
    mixed = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads[len(arch):], v)), arch)
    return [model(x), *grads[:len(arch)], *mixed]


def test_supernet_skipping_none_matches_the_full_weighted_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the original computation (every op run, Zero included, NCHW, plain dilated convs), in float64:
    the logits, the alpha gradient and the second derivatives through double backward."""
    model, x = tiny_net().double(), images().double()
    v = [torch.randn_like(p) for p in model.weight_parameters()]
    ours = logits_and_arch_derivatives(model, x, v)
    monkeypatch.setattr(MixedOp, "forward", reference_mixed_forward)
    monkeypatch.setattr(DilatedDepthwiseConv2d, "forward", torch.nn.Conv2d.forward)
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, channels_last=False))
    reference = logits_and_arch_derivatives(model, x, v)
    for got, expected in zip(ours, reference):
        assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_functional_call_with_new_alphas_equals_setting_them_in_place() -> None:
    model, x = tiny_net(), images()
    before = model(x)
    new = {name: torch.randn_like(p, requires_grad=True) for name, p in model.named_arch_parameters()}
    substituted = functional_call(model, new, (x,))
    assert not torch.allclose(substituted, before)
    grads = torch.autograd.grad(substituted.sum(), list(new.values()))
    assert all(g.abs().sum() > 0 for g in grads)  # the substituted tensors are the ones used
    assert torch.equal(model(x), before)  # the module's own alphas are untouched
    with torch.no_grad():
        for name, value in new.items():
            getattr(model, name).copy_(value)
    assert torch.allclose(model(x), substituted, atol=1e-6)


def test_forward_is_deterministic_and_layout_independent() -> None:
    x = images()
    model = tiny_net()
    assert torch.equal(model(x), model(x))
    nchw = tiny_net(SupernetConfig(C=4, layers=3, channels_last=False))
    assert torch.allclose(model(x), nchw(x), atol=1e-5)


def test_unknown_op_raises_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'conv_7x1_1x7'.*sep_conv_3x3"):
        SupernetConfig(primitives=("none", "conv_7x1_1x7"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("primitives", ("max_pool_3x3", "max_pool_3x3"), "twice"),
    ("primitives", ("none",), "other than 'none'"),
    ("multiplier", 5, "multiplier"),
    ("C", 5, "even"),
    ("layers", 0, "layers"),
])
def test_bad_config_raises_config_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SupernetConfig(**{field: value})


def test_search_space_without_none() -> None:
    primitives = ("max_pool_3x3", "skip_connect", "sep_conv_3x3")
    model = tiny_net(SupernetConfig(C=4, layers=3, primitives=primitives))
    assert model.alphas_normal.shape == (14, 3)
    assert model(images()).shape == (2, 10)
    assert {op for op, _ in model.genotype().normal} <= set(primitives)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_supernet_forward_backward_on_cuda() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Supernet().to(device)
    x = torch.randn(8, 3, 32, 32, device=device)
    logits = model(x)
    assert logits.shape == (8, 10)
    F.cross_entropy(logits, torch.zeros(8, dtype=torch.long, device=device)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
