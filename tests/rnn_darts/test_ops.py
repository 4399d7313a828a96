"""The recurrent search space's activations and AWD-LSTM dropouts."""
from __future__ import annotations

import pytest
import torch

from rnn_darts.dropout import dropout_mask, embedding_dropout, locked_dropout
from rnn_darts.ops import ACTIVATIONS, NONE, get_activation
from shared.genotypes import RNN_PRIMITIVES

# Independent closed forms of each op, so the registry is checked against something other than itself.
EXPECTED = {
    "none": lambda x: x * 0.0,
    "tanh": lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "identity": lambda x: x,
}


def test_registry_names_are_the_search_space() -> None:
    assert ACTIVATIONS.names() == RNN_PRIMITIVES
    assert NONE in ACTIVATIONS


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_activation_matches_closed_form(name: str) -> None:
    x = torch.linspace(-4, 4, 60, dtype=torch.float64).reshape(3, 4, 5)
    y = get_activation(name)(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, EXPECTED[name](x))


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_activation_is_differentiable(name: str) -> None:
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    get_activation(name)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_activation_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="tanh"):
        get_activation("gelu")


def test_duplicate_activation_raises() -> None:
    with pytest.raises(KeyError, match="duplicate"):
        ACTIVATIONS.add("relu", torch.relu)


# ---- dropout -----------------------------------------------------------------------------------------------------
def test_dropout_mask_values_and_rate() -> None:
    torch.manual_seed(0)
    mask = dropout_mask((200, 300), 0.25, torch.empty(0, dtype=torch.float64))
    values = set(mask.unique().tolist())
    assert values <= {0.0, 1 / 0.75}
    assert abs((mask == 0).float().mean().item() - 0.25) < 0.01
    assert abs(mask.mean().item() - 1.0) < 0.02  # scaled so the expectation is kept


def test_locked_dropout_shares_one_mask_over_time() -> None:
    torch.manual_seed(0)
    x = torch.ones(7, 4, 50)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:1].expand_as(y))  # every time step sees the mask of step 0
    assert (y == 0).any() and (y == 2.0).any()


@pytest.mark.parametrize("training, p", [(False, 0.5), (True, 0.0)])
def test_locked_dropout_identity_without_draw(training: bool, p: float) -> None:
    x = torch.randn(5, 3, 8)
    state = torch.get_rng_state()
    assert locked_dropout(x, p, training) is x
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn: RNG replay stays aligned


def test_embedding_dropout_drops_whole_words() -> None:
    torch.manual_seed(0)
    weight = torch.randn(20, 6)
    tokens = torch.randint(0, 20, (30, 4))
    emb = embedding_dropout(weight, tokens, 0.5, training=True)
    dropped = (emb == 0).all(-1)  # (T, B): this occurrence's row was dropped
    for word in tokens.unique():
        where = tokens == word
        assert dropped[where].all() or not dropped[where].any()  # all occurrences share one draw
    kept = ~dropped
    torch.testing.assert_close(emb[kept], 2.0 * weight[tokens[kept]])  # kept rows scaled by 1 / (1 - p)
    assert dropped.any() and kept.any()


def test_embedding_dropout_equals_row_masked_matrix() -> None:
    """Same as AWD-LSTM's F.embedding(tokens, weight * mask) with a (ntoken, 1) mask from the same draw."""
    weight = torch.randn(20, 6)
    tokens = torch.randint(0, 20, (9, 3))
    torch.manual_seed(1)
    emb = embedding_dropout(weight, tokens, 0.3, training=True)
    torch.manual_seed(1)
    mask = dropout_mask((20,), 0.3, weight)
    torch.testing.assert_close(emb, torch.nn.functional.embedding(tokens, weight * mask[:, None]))


def test_embedding_dropout_eval_is_plain_lookup() -> None:
    weight = torch.randn(20, 6)
    tokens = torch.randint(0, 20, (9, 3))
    assert torch.equal(embedding_dropout(weight, tokens, 0.5, training=False), weight[tokens])
