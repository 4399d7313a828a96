"""The REINFORCE controller over a supernet's decisions: valid cells, exact log-probabilities, learning from a
reward, and a state that resumes."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from cnn_darts.supernet import Supernet
from cnn_darts.supernet import SupernetConfig as CNNConfig
from rnn_darts.supernet import RNNSupernet
from rnn_darts.supernet import SupernetConfig as RNNConfig
from shared.controller import Controller, ControllerArchitectures, ControllerConfig
from shared.errors import ConfigError
from shared.sampling import Decision, alphas_set


def cnn() -> Supernet:
    return Supernet(CNNConfig(C=4, num_classes=2, layers=3, steps=3, multiplier=3))


def test_sampled_tokens_respect_each_decisions_choices_and_distinct_inputs() -> None:
    model = cnn()
    controller = Controller(model.decisions())
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        tokens, _, _ = controller.run(generator)
        for token, decision in zip(tokens, model.decisions()):
            assert 0 <= token < decision.choices
            if decision.distinct_from is not None:
                assert token != tokens[decision.distinct_from]
        with alphas_set(model, model.alphas_from(tokens)):
            genotype = model.genotype()
        assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)


def test_the_log_probability_of_given_tokens_is_the_sum_of_the_masked_softmaxes() -> None:
    """Two decisions, 2 and 3 choices, the second distinct from the first: computed by hand from the module."""
    torch.manual_seed(0)
    decisions = [Decision("input", 2), Decision("input", 3, distinct_from=0)]
    controller = Controller(decisions, hidden=4)
    tokens = [1, 0]
    _, log_prob, entropy = controller.run(None, given=tokens)
    h1, c1 = controller.cell(controller.embed(torch.tensor([3])))
    z1 = controller.heads["input"](h1)[0][:2]
    h2, _ = controller.cell(controller.embed(torch.tensor([1])), (h1, c1))
    z2 = controller.heads["input"](h2)[0][[0, 2]]  # token 1 is masked (distinct from the first), token 3 is no choice
    expected = torch.log_softmax(z1, 0)[1] + torch.log_softmax(z2, 0)[0]
    assert log_prob.item() == pytest.approx(expected.item(), rel=1e-6)
    p1, p2 = torch.softmax(z1, 0), torch.softmax(z2, 0)
    by_hand = -(p1 * p1.log()).sum() - (p2 * p2.log()).sum()
    assert entropy.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_reinforce_learns_to_prefer_the_rewarded_cell() -> None:
    """Reward 1 when node 1 of the RNN cell takes op 0 (tanh), else 0: its probability rises well above 1/4."""
    torch.manual_seed(0)
    model = RNNSupernet(RNNConfig(ntoken=20, ninp=8, nhid=8, steps=2))
    config = ControllerConfig(controller_lr=0.05, controller_every=1, controller_samples=8, baseline_decay=0.5)
    search = ControllerArchitectures(model, samples=4, seed=0, config=config)

    def reward() -> float:
        return float(torch.softmax(model.alphas, -1)[0, 1] == 1.0)  # edge (s_0 -> node 1), op tanh

    def share() -> float:
        return sum(reward_of(search.next()) for _ in range(200)) / 200

    def reward_of(logits: dict) -> float:
        with alphas_set(model, logits):
            return reward()

    before = share()
    for _ in range(60):
        search.update(reward)
    after = share()
    assert before < 0.4 and after > 0.8
    assert search.epoch_metrics()["controller_reward"] > before


def test_the_controllers_state_resumes_its_samples_and_steps() -> None:
    model = RNNSupernet(RNNConfig(ntoken=20, ninp=8, nhid=8, steps=3))
    config = ControllerConfig(controller_every=1)
    search = ControllerArchitectures(model, samples=2, seed=1, config=config)
    for _ in range(3):
        search.update(lambda: 1.0)
    state = copy.deepcopy(search.state_dict())  # as a checkpoint holds it: no tensor shared with the live search
    again = ControllerArchitectures(model, samples=2, seed=99, config=config)
    again.load_state_dict(state)
    assert torch.equal(again.next()["alphas"], search.next()["alphas"])
    search.update(lambda: 0.5)
    again.update(lambda: 0.5)
    for a, b in zip(search.controller.parameters(), again.controller.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("changes, key", [({"controller_every": 0}, "controller_every"),
                                          ({"controller_lr": -1.0}, "controller_lr"),
                                          ({"baseline_decay": 1.0}, "baseline_decay"),
                                          ({"controller_samples": 1.5}, "controller_samples")])
def test_bad_controller_config_is_one_line(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ControllerConfig(**changes)


def test_entropy_of_a_fresh_controller_is_near_uniform() -> None:
    decisions = RNNSupernet(RNNConfig(ntoken=20, ninp=8, nhid=8, steps=2)).decisions()
    _, _, entropy = Controller(decisions).run(torch.Generator().manual_seed(0))
    uniform = sum(math.log(d.choices) for d in decisions)
    assert 0.9 * uniform < entropy.item() <= uniform + 1e-9
