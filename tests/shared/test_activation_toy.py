"""The activation toy of NAS with RL: REINFORCE and DARTS both find (linear, linear); the controller's probabilities
against hand computation."""
from __future__ import annotations

import math

import pytest
import torch

from shared.activation_toy import ToyController, darts, reinforce, rewards, toy_data


@pytest.fixture(scope="module")
def reward() -> dict:
    return rewards(toy_data())


def test_only_linear_linear_fits_y_equals_2x(reward) -> None:
    assert max(reward, key=reward.get) == (0, 0)
    assert -reward[(0, 0)] == pytest.approx(0.1 ** 2, rel=0.3)  # the noise variance: the fit is as good as it gets
    assert all(value < 50 * reward[(0, 0)] for pair, value in reward.items() if pair != (0, 0))


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_puts_more_than_095_on_linear_linear(seed: int) -> None:
    result = reinforce(rewards(toy_data(seed=seed)), seed=seed)
    assert result.probabilities[(0, 0)] > 0.95
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.path[0] < 0.5 < result.path[-1]  # it learned: every architecture starts at 1/4


@pytest.mark.parametrize("order", ["first", "second", "exact"])
def test_darts_picks_linear_linear_in_every_order(order: str) -> None:
    result = darts(toy_data(), order)
    assert result.pair == (0, 0)
    assert result.softmax[0][0] > 0.9 and result.softmax[1][0] > 0.9


def test_the_controllers_log_probability_of_a_sample_is_the_hand_computed_one() -> None:
    controller = ToyController()
    values = {"c": 0.3, "w1": -0.7, "b1": 0.2, "w2": 1.5, "b2": -0.4}
    with torch.no_grad():
        for key, value in values.items():
            getattr(controller, key).fill_(value)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    second = s(1.5 * math.tanh(-0.7 * 1 + 0.2) - 0.4)  # P(a2 = sigmoid | a1 = sigmoid)
    expected = math.log(s(0.3)) + math.log(1 - second)  # a1 = sigmoid, a2 = linear
    got = controller.log_prob(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    probabilities = controller.probabilities()
    assert sum(probabilities.values()) == pytest.approx(1.0)
    entropy = -sum(p * math.log(p) for p in probabilities.values())
    assert controller.entropy().item() == pytest.approx(entropy, rel=1e-12)
