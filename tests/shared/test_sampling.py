"""Random search with weight sharing: sampled cells are valid one-hot cells of each space, the supernet computes
exactly them, and the search keeps the best-scored one."""
from __future__ import annotations

import pytest
import torch

from cnn_darts.supernet import Supernet
from cnn_darts.supernet import SupernetConfig as CNNConfig
from rnn_darts.supernet import RNNSupernet
from rnn_darts.supernet import SupernetConfig as RNNConfig
from shared.errors import ConfigError
from shared.sampling import RandomArchitectures, alphas_set, check_strategy, uniform_tokens


def test_a_sampled_rnn_cell_has_one_predecessor_and_one_real_op_per_node() -> None:
    model = RNNSupernet(RNNConfig(ntoken=20, ninp=8, nhid=8, steps=4))
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.softmax(model.alphas_from(uniform_tokens(model.decisions(), generator))["alphas"], -1)
        assert torch.equal(probs.sum(-1), torch.ones(10)) and set(probs.unique().tolist()) == {0.0, 1.0}
        start = 0
        for i in range(4):
            block = probs[start:start + i + 1]
            assert int(block[:, 1:].sum()) == 1  # exactly one (predecessor, op other than none)
            start += i + 1


def test_a_sampled_cnn_cell_has_two_distinct_inputs_per_node_in_both_cells() -> None:
    model = Supernet(CNNConfig(C=4, num_classes=2, layers=3, steps=3, multiplier=3))
    generator = torch.Generator().manual_seed(0)
    seen_inputs = set()
    for _ in range(20):
        logits = model.alphas_from(uniform_tokens(model.decisions(), generator))
        with alphas_set(model, logits):
            genotype = model.genotype()
        for name, edges in (("alphas_normal", genotype.normal), ("alphas_reduce", genotype.reduce)):
            probs = torch.softmax(logits[name], -1)
            start = 0
            for i in range(3):
                chosen = probs[start:start + 2 + i, 1:].sum(-1)
                assert int(chosen.sum()) == 2 and set(chosen.tolist()) <= {0.0, 1.0}
                start += 2 + i
            assert all(op != "none" for op, _ in edges)
            seen_inputs.add(tuple(j for _, j in edges))
    assert len(seen_inputs) > 5  # drawn, not fixed


def test_the_supernet_with_a_sampled_cell_computes_only_the_chosen_ops_and_alphas_come_back() -> None:
    """Perturbing the weights of every op the sampled cell left out changes nothing; perturbing a chosen
    convolution does; the model's own alphas are back afterwards."""
    torch.manual_seed(0)
    model = Supernet(CNNConfig(C=4, num_classes=2, layers=3, steps=2, multiplier=2)).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "alphas" in name}
    logits = model.alphas_from(uniform_tokens(model.decisions(), torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, 8, 8)
    with alphas_set(model, logits):
        out = model(x)
        chosen = []
        with torch.no_grad():
            for cell in model.cells:
                weights = logits["alphas_reduce" if cell.reduction else "alphas_normal"]
                for e, edge in enumerate(cell.edges):
                    for k, op in enumerate(edge.ops):
                        if weights[e, k] == 0.0:
                            chosen += [p for p in op.parameters() if p.dim() == 4]
                        else:
                            for p in op.parameters():
                                p.add_(torch.randn_like(p))
        assert torch.allclose(model(x), out, atol=1e-6)
        assert chosen, "a sampled cell of 2 nodes x 2 cells has a convolution"
        with torch.no_grad():
            for p in chosen:
                p.add_(torch.randn_like(p))
        assert not torch.allclose(model(x), out, atol=1e-4)
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters() if name in before)


def test_select_keeps_the_lowest_scored_cell_and_resumes_its_draws() -> None:
    model = RNNSupernet(RNNConfig(ntoken=20, ninp=8, nhid=8, steps=2))
    search = RandomArchitectures(model, samples=5, seed=3)
    scores = iter([3.0, 1.0, 2.0, 5.0, 4.0])
    seen = []

    def score() -> dict[str, float]:
        seen.append(model.alphas.detach().clone())
        return {"valid_loss": next(scores)}

    assert search.select(score, "valid_loss") == {"valid_loss": 1.0}
    assert torch.equal(torch.softmax(search.best["alphas"], -1), torch.softmax(seen[1], -1))
    state = search.state_dict()
    again = RandomArchitectures(model, samples=5, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.next()["alphas"], search.next()["alphas"])


@pytest.mark.parametrize("strategy, samples, key", [("evolution", 10, "strategy"), ("random", 0, "select_cells"),
                                                    ("random", 2.5, "select_cells")])
def test_bad_strategy_config_is_one_line(strategy: str, samples, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        check_strategy(strategy, samples)
