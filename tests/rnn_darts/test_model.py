"""The derived recurrent network: the paper's parameter count, and the cell against a direct transcription."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from rnn_darts.model import ModelConfig, RNNModel
from shared.errors import ConfigError
from shared.genotypes import RNNGenotype, published

ACT = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def reference_cell(model: RNNModel, x: Tensor, h: Tensor, genotype: RNNGenotype) -> Tensor:
    """quark0/darts rnn/model.py DARTSCell.cell in eval mode, written out: cat, mm, split, highway per node."""
    nhid = model.config.nhid
    c0, h0 = torch.split(torch.cat([x, h], dim=-1).mm(model.cell.W0), nhid, dim=-1)
    states = [h + c0.sigmoid() * (h0.tanh() - h)]
    for i, (name, pred) in enumerate(genotype.recurrent):
        s_prev = states[pred]
        c, hh = torch.split(s_prev.mm(model.cell.Ws[i]), nhid, dim=-1)
        states.append(s_prev + c.sigmoid() * (ACT[name](hh) - s_prev))
    return torch.mean(torch.stack([states[i] for i in genotype.concat], -1), -1)


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_eval_forward_matches_the_original_cell_step_by_step(name: str) -> None:
    torch.manual_seed(0)
    genotype = published("rnn", name)
    model = RNNModel(ModelConfig(ntoken=30, ninp=7, nhid=7, init_range=0.5), genotype).eval()
    tokens = torch.randint(0, 30, (5, 3))
    hidden = 0.3 * torch.randn(1, 3, 7)
    logits, new_hidden, outputs, _ = model(tokens, hidden)
    h, expected = hidden[0], []
    for t in range(5):
        h = reference_cell(model, model.encoder.weight[tokens[t]], h, genotype)
        expected.append(h)
    torch.testing.assert_close(outputs, torch.stack(expected))
    torch.testing.assert_close(new_hidden[0], expected[-1])
    torch.testing.assert_close(logits, outputs @ model.encoder.weight.T + model.decoder.bias)


def test_darts_v2_at_850_has_the_papers_23m_parameters() -> None:
    model = RNNModel(ModelConfig(ntoken=10_000), published("rnn", "DARTS_V2"))
    # W0 (1700 x 1700) + 8 x Ws (850 x 1700) + tied embedding (10000 x 850) + decoder bias (10000)
    assert model.num_parameters() == 1700 * 1700 + 8 * 850 * 1700 + 10_000 * 850 + 10_000
    assert model.num_parameters() == pytest.approx(23e6, rel=0.02)


def test_training_mode_draws_masks_and_eval_mode_is_deterministic() -> None:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(ntoken=30, ninp=8, nhid=8), published("rnn", "DARTS_V2"))
    tokens, hidden = torch.randint(0, 30, (4, 2)), torch.zeros(1, 2, 8)
    model.eval()
    torch.testing.assert_close(model(tokens, hidden)[0], model(tokens, hidden)[0])
    model.train()
    assert not torch.equal(model(tokens, hidden)[0], model(tokens, hidden)[0])


@pytest.mark.parametrize("field, value", [("ninp", 10), ("ntoken", 0), ("dropoute", 1.0)])
def test_bad_config_values_are_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{"ntoken": 30, "ninp": 8, "nhid": 8, field: value})
