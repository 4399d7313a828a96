"""The activation toy of NAS with reinforcement learning (Zoph & Le 2017): REINFORCE and DARTS on a problem whose
answer is known, tracked by Sacred.

    python -m experiments.activation_toy                        # both methods, every order of the engine
    python -m experiments.activation_toy with noise=0.3 seed=2

Data y = 2x + noise; a model y = g(h(x u) v) with h and g each linear or sigmoid: (linear, linear) is best. Logs the
four rewards (minus the fitted validation MSE), the controller's P(linear, linear) after every step, and per order
the softmax weight of linear in each layer after every DARTS step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from shared.activation_toy import darts, name, reinforce, rewards, toy_data
from shared.bilevel import ORDERS
from shared.errors import ConfigError
from shared.validation import check_at_least, check_fields


@dataclass(frozen=True)
class ActivationToyConfig:
    """The run's keys (their defaults: the config scope), checked before it starts."""

    seed: int
    samples: int
    noise: float
    controller_steps: int
    controller_samples: int
    controller_lr: float
    baseline_decay: float
    entropy_weight: float
    orders: tuple[str, ...]
    darts_steps: int

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.orders or any(order not in ORDERS or order == "plain" for order in self.orders):
            raise ConfigError(f"orders must be a non-empty list of first, second, exact, got {self.orders!r}")
        check_at_least(self, 1, "samples", "controller_steps", "controller_samples", "darts_steps")
        check_at_least(self, 0, "seed", "noise", "entropy_weight")
        if not 0 <= self.baseline_decay < 1 or self.controller_lr <= 0:
            raise ConfigError(f"baseline_decay must be in [0, 1) and controller_lr > 0, got "
                              f"{self.baseline_decay} and {self.controller_lr}")


CONFIGS = (ActivationToyConfig,)  # checked by make_experiment's validation before a run starts
ex = make_experiment("activation_toy", globals())


@ex.config
def config() -> None:
    """REINFORCE and DARTS on the two-layer activation toy (Zoph & Le 2017)."""
    seed = 0  # the data and the controller's samples
    samples = 256  # data points per half (train fits the weights, valid gives the reward / the architecture loss)
    noise = 0.1  # standard deviation of the noise on y = 2x
    controller_steps = 300  # REINFORCE steps
    controller_samples = 8  # architectures sampled per step
    controller_lr = 0.05  # Adam on the controller's five parameters
    baseline_decay = 0.9  # the reward's exponential moving average, subtracted as baseline
    entropy_weight = 1e-3  # the entropy bonus
    orders = ["first", "second", "exact"]  # DARTS orders to run
    darts_steps = 300  # architecture + weight steps per order


@experiment_main(ex, None)
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    seed, samples, noise, orders, darts_steps = (config[k] for k in ("seed", "samples", "noise", "orders",
                                                                     "darts_steps"))
    data = toy_data(samples, noise, seed)
    reward = rewards(data)
    run.info["rewards"] = {name(pair): value for pair, value in reward.items()}
    controller = reinforce(reward, config["controller_steps"], config["controller_samples"],
                           config["controller_lr"], config["baseline_decay"], config["entropy_weight"], seed)
    for step, p in enumerate(controller.path, start=1):
        run.log_scalar("reinforce_p_linear_linear", p, step)
    best = max(controller.probabilities, key=controller.probabilities.get)
    result: dict[str, Any] = {"reinforce": {"architecture": name(best), "probability": controller.probabilities[best]},
                              "darts": {}}
    for order in orders:
        found = darts(data, order, darts_steps)
        for step, (first, second) in enumerate(found.path, start=1):
            run.log_scalar(f"darts_{order}_linear_layer1", first, step)
            run.log_scalar(f"darts_{order}_linear_layer2", second, step)
        result["darts"][order] = {"architecture": name(found.pair), "softmax": found.softmax}
    return result


if __name__ == "__main__":
    run_commandline(ex)
