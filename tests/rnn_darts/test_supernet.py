"""The recurrent search supernet: shapes, tying, alphas, genotype, numerics against a plain loop, and its losses."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from rnn_darts.loss import ar, language_model_loss, tar
from rnn_darts.ops import ACTIVATIONS, NONE
from rnn_darts.supernet import RNNSupernet, SupernetConfig
from shared.errors import ConfigError
from shared.genotypes import RNN_PRIMITIVES, RNNGenotype

T, B, NTOKEN, SIZE = 7, 3, 50, 16
OPS = [name for name in ACTIVATIONS.names() if name != NONE]


def tiny(steps: int = 3, **overrides) -> RNNSupernet:
    torch.manual_seed(0)
    return RNNSupernet(SupernetConfig(ntoken=NTOKEN, ninp=SIZE, nhid=SIZE, steps=steps, **overrides))


def tokens(t: int = T, b: int = B, ntoken: int = NTOKEN) -> Tensor:
    return torch.randint(0, ntoken, (t, b), generator=torch.Generator().manual_seed(1))


# ---- structure ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes(steps: int, training: bool) -> None:
    model = tiny(steps).train(training)
    logits, hidden, outputs, dropped = model(tokens(), model.init_hidden(B))
    assert logits.shape == (T, B, NTOKEN)
    assert hidden.shape == (1, B, SIZE)
    assert outputs.shape == dropped.shape == (T, B, SIZE)
    torch.testing.assert_close(hidden[0], outputs[-1])
    assert model.alphas.shape == (steps * (steps + 1) // 2, len(RNN_PRIMITIVES))


def test_tied_embedding_is_one_parameter() -> None:
    model = tiny()
    assert model.encoder.weight is model.decoder.weight
    names = [name for name, _ in model.named_parameters()]
    assert "encoder.weight" in names and "decoder.weight" not in names
    fresh = tiny()
    nn.init.zeros_(fresh.encoder.weight)
    fresh.load_state_dict(model.state_dict())
    assert fresh.encoder.weight is fresh.decoder.weight
    torch.testing.assert_close(fresh.decoder.weight, model.encoder.weight)
    assert not model.decoder.bias.any()
    r = model.config.init_range  # the original's one INITRANGE for the embedding and the cell
    assert r / 2 < model.encoder.weight.abs().max() <= r


def test_alphas_in_state_dict_and_no_buffers() -> None:
    model = tiny(steps=8)
    state = model.state_dict()
    assert state["alphas"].shape == (36, 5)
    assert list(model.buffers()) == []  # batch statistics only: nothing for an architecture step to corrupt
    fresh = tiny(steps=8)
    nn.init.zeros_(fresh.alphas)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.alphas, model.alphas)


def test_arch_and_weight_parameters_partition_the_model() -> None:
    model = tiny()
    arch, weights = model.arch_parameters(), model.weight_parameters()
    assert [id(p) for p in arch] == [id(model.alphas)]
    ids = [id(p) for p in arch + weights]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_every_parameter_gets_a_gradient() -> None:
    model = tiny().train()
    logits, _, outputs, _ = model(tokens(), model.init_hidden(B))
    (language_model_loss(logits, tokens()) + tar(outputs)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- genotype ----------------------------------------------------------------------------------------------------
def test_genotype_is_valid() -> None:
    genotype = tiny(steps=8).genotype()
    assert isinstance(genotype, RNNGenotype)
    assert genotype.steps == 8 and genotype.concat == tuple(range(1, 9))


@pytest.mark.parametrize("op", OPS)
def test_genotype_picks_the_dominant_edges(op: str) -> None:
    model = tiny(steps=3)
    wanted = [(op, 0), ("relu", 0), (op, 2)]  # (op, predecessor) for nodes 1..3
    with torch.no_grad():
        model.alphas.zero_()
        offset = 0
        for i, (name, j) in enumerate(wanted):
            model.alphas[offset + j, RNN_PRIMITIVES.index(name)] = 2.0
            # 'none' is larger still on another predecessor, and must be ignored (as the original _parse).
            model.alphas[offset + (j + 1) % (i + 1), 0] = 5.0
            offset += i + 1
    assert model.genotype() == RNNGenotype(recurrent=tuple(wanted), concat=(1, 2, 3))


# ---- numerics against a plain loop -------------------------------------------------------------------------------
REFERENCE_OPS = {"tanh": torch.tanh, "relu": lambda v: v.clamp(min=0), "sigmoid": lambda v: 1 / (1 + torch.exp(-v)),
                 "identity": lambda v: v}


def batch_norm(v: Tensor, eps: float = 1e-5) -> Tensor:
    return (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + eps)


def reference_cell(x: Tensor, h: Tensor, W0: Tensor, Ws: list[Tensor], probs: Tensor, primitives: tuple[str, ...],
                   x_mask: Tensor, h_mask: Tensor) -> Tensor:
    """The cell formula, one predecessor and one op at a time. x (T, B, ninp), h (B, H) -> outputs (T, B, H)."""
    nhid, outputs = h.size(-1), []
    for x_t in x:
        c0, h0 = torch.split(torch.cat([x_t * x_mask, h * h_mask], -1) @ W0, nhid, -1)
        states = [batch_norm(h + torch.sigmoid(c0) * (torch.tanh(h0) - h))]
        offset = 0
        for i, W in enumerate(Ws):
            s = torch.zeros_like(h)
            for j in range(i + 1):
                c, hj = torch.split((states[j] * h_mask) @ W, nhid, -1)
                c = torch.sigmoid(c)
                for k, name in enumerate(primitives):
                    if name != NONE:
                        s = s + probs[offset + j, k] * (states[j] + c * (REFERENCE_OPS[name](hj) - states[j]))
            states.append(batch_norm(s))
            offset += i + 1
        h = torch.stack(states[1:]).mean(0)
        outputs.append(h)
    return torch.stack(outputs)


@pytest.mark.parametrize("primitives", [RNN_PRIMITIVES] + [(NONE, op) for op in OPS], ids=lambda p: "-".join(p))
@pytest.mark.parametrize("masked", [True, False])
def test_cell_matches_reference_loop(primitives: tuple[str, ...], masked: bool) -> None:
    model = tiny(steps=4, primitives=primitives).double()
    with torch.no_grad():
        model.alphas.normal_()  # far from uniform, so a wrong (pred, op) weight shows
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, SIZE, dtype=torch.float64, generator=gen)
    h = torch.randn(5, SIZE, dtype=torch.float64, generator=gen)
    ones = torch.ones(5, SIZE, dtype=torch.float64)
    x_mask = (torch.rand(5, SIZE, generator=gen) > 0.3).double() / 0.7 if masked else ones
    h_mask = (torch.rand(5, SIZE, generator=gen) > 0.3).double() / 0.7 if masked else ones
    cell = model.cell
    probs = F.softmax(model.alphas, dim=-1)
    got = cell(x, h, probs, x_mask, h_mask) if masked else cell(x, h, probs)
    want = reference_cell(x, h, cell.W0, list(cell.Ws), F.softmax(model.alphas, dim=-1), primitives, x_mask, h_mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The architecture step differentiates this path: the gradients must agree too.
    probe = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    inputs = [model.alphas, cell.W0, *cell.Ws]
    expected = torch.autograd.grad((want * probe).sum(), inputs)
    for a, b in zip(torch.autograd.grad((got * probe).sum(), inputs), expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_supernet_eval_is_decoder_of_reference_cell() -> None:
    model = tiny(steps=3).double().eval()
    tok, h = tokens(), model.init_hidden(B)
    logits, hidden, outputs, dropped = model(tok, h)
    ones = torch.ones(B, SIZE, dtype=torch.float64)
    want = reference_cell(model.encoder.weight[tok], h[0], model.cell.W0, list(model.cell.Ws),
                          F.softmax(model.alphas, -1), RNN_PRIMITIVES, ones, ones)
    torch.testing.assert_close(outputs, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(dropped, outputs)
    torch.testing.assert_close(logits, want @ model.encoder.weight.T + model.decoder.bias)


# ---- the batch-statistics fix ------------------------------------------------------------------------------------
def test_untrained_default_model_is_finite_from_the_first_evaluation() -> None:
    torch.manual_seed(0)
    model = RNNSupernet(SupernetConfig(ntoken=1000)).eval()
    tok = tokens(35, 10, 1000)
    with torch.no_grad():
        logits, hidden, outputs, _ = model(tok, model.init_hidden(10))
        assert torch.isfinite(logits).all()
        assert hidden.abs().max() < 1e3 and outputs.abs().max() < 1e3
        # The original's BN (running statistics, untrained, in eval) blows the same model up: the test discriminates.
        model.cell.bn = nn.BatchNorm1d(300, affine=False).eval()
        _, hidden, _, _ = model(tok[:15], model.init_hidden(10))  # 15 steps suffice to pass 1e3 (1e22 by 35)
        assert not hidden.abs().max() < 1e3


def test_eval_equals_train_without_dropout() -> None:
    """With batch statistics in both modes, only the dropouts tell train from eval."""
    zero = dict(dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0, dropoute=0.0)
    model = tiny(steps=3, **zero)
    tok, h = tokens(), model.init_hidden(B)
    train = model.train()(tok, h)
    evaluation = model.eval()(tok, h)
    for a, b in zip(train, evaluation):
        torch.testing.assert_close(a, b)


def test_batch_of_one_is_refused() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="batch"):
        model(tokens(b=1), model.init_hidden(1))


# ---- dropout and randomness --------------------------------------------------------------------------------------
def test_train_mode_is_a_function_of_the_global_seed() -> None:
    model = tiny(steps=3, dropoute=0.1).train()
    tok, h = tokens(), model.init_hidden(B)
    torch.manual_seed(5)
    first = model(tok, h)
    torch.manual_seed(5)
    second = model(tok, h)
    torch.manual_seed(6)
    other = model(tok, h)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_eval_mode_is_deterministic_and_draws_nothing() -> None:
    model = tiny(steps=3, dropoute=0.1).eval()
    tok, h = tokens(), model.init_hidden(B)
    state = torch.get_rng_state()
    first, second = model(tok, h), model(tok, h)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["alphas", "cell.W0", "cell.Ws.1", "encoder.weight", "decoder.bias"])
def test_functional_call_equals_setting_the_parameter(name: str) -> None:
    """The engine evaluates shifted parameters with functional_call: it must see every parameter, alphas included."""
    model = tiny(steps=3).train()
    tok, h = tokens(), model.init_hidden(B)
    current = dict(model.named_parameters())[name]
    new = (current.detach() + 0.5 * torch.randn_like(current)).requires_grad_()
    torch.manual_seed(7)
    logits, *_ = functional_call(model, {name: new}, (tok, h))
    logits.sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    with torch.no_grad():
        current.copy_(new)  # for encoder.weight this also moves the tied decoder weight, as functional_call does
    torch.manual_seed(7)
    torch.testing.assert_close(logits, model(tok, h)[0], rtol=0, atol=0)


# ---- config ------------------------------------------------------------------------------------------------------
def test_unknown_activation_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'gelu'.*tanh, relu"):
        SupernetConfig(ntoken=10, primitives=("none", "gelu"))


@pytest.mark.parametrize("field, value", [
    ("ntoken", 0), ("nhid", -3), ("steps", 0), ("dropout", 1.0), ("dropouth", -0.1), ("dropoute", 1.5),
    ("init_range", 0.0), ("init_range", None), ("input_init_range", 0.0), ("input_init_range", -1.0),
    ("input_init_range", "big"), ("ninp", 200), ("primitives", ("none",)), ("primitives", ("tanh", "tanh")),
])
def test_bad_config_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field if field != "ninp" else "ninp and nhid"):
        dataclasses.replace(SupernetConfig(ntoken=10), **{field: value})


@pytest.mark.parametrize("input_init_range", [None, 0.9])
def test_input_rows_of_the_first_matrix_take_their_own_init_range(input_init_range: float | None) -> None:
    model = tiny(init_range=0.04, input_init_range=input_init_range)
    W0 = model.cell.W0.detach()  # (ninp + nhid, 2 nhid): x rows first
    bound = 0.04 if input_init_range is None else input_init_range
    assert W0[:SIZE].abs().max() <= bound and W0[:SIZE].abs().max() > 0.5 * bound
    assert W0[SIZE:].abs().max() <= 0.04  # the hidden rows keep init_range
    assert all(W.abs().max() <= 0.04 for W in model.cell.Ws)


def test_config_is_frozen_with_paper_defaults() -> None:
    config = SupernetConfig(ntoken=10000)
    assert (config.ninp, config.nhid, config.steps, config.num_edges) == (300, 300, 8, 36)
    assert (config.init_range, config.input_init_range) == (0.04, None)
    assert (config.dropout, config.dropouth, config.dropoutx, config.dropouti, config.dropoute) == (
        0.75, 0.25, 0.75, 0.2, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 4  # type: ignore[misc]


# ---- losses ------------------------------------------------------------------------------------------------------
def test_language_model_loss_is_mean_token_cross_entropy() -> None:
    logits = torch.randn(4, 2, 6, dtype=torch.float64)
    targets = torch.randint(0, 6, (4, 2))
    want = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(language_model_loss(logits, targets), want)


def test_tar_and_ar_closed_forms() -> None:
    h = torch.arange(12, dtype=torch.float64).reshape(3, 2, 2)  # each step is the last plus 4
    torch.testing.assert_close(tar(h, beta=0.5), torch.tensor(0.5 * 16.0, dtype=torch.float64))
    torch.testing.assert_close(ar(h, alpha=2.0), 2.0 * h.pow(2).mean())
    assert tar(h).item() == pytest.approx(1e-3 * 16.0)
