"""The paper's illustrative bilevel problem (section 2.3) through the engine: a runnable check of its orders.

    python -m experiments.paper_toy with order=second xi=0.5      # alpha -> 1.0, the true bilevel optimum
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from shared.bilevel import ORDERS
from shared.errors import ConfigError
from shared.toy import fixed_point, solve
from shared.validation import check_fields

TOY_ORDERS = tuple(order for order in ORDERS if order != "plain")


@dataclass(frozen=True)
class ToyConfig:
    """The run's keys (their defaults: the config scope), checked before it starts."""

    order: str
    xi: float
    steps: int
    arch_lr: float

    def __post_init__(self) -> None:
        check_fields(self)
        if self.order not in TOY_ORDERS:  # plain would leave alpha where it starts: the toy compares the orders
            raise ConfigError(f"order must be one of {', '.join(TOY_ORDERS)}, got {self.order!r}")
        if not 0 < self.xi < 1:
            raise ConfigError(f"xi must be in (0, 1) for the alternating steps to converge, got {self.xi}")
        if self.steps < 1 or self.arch_lr <= 0:
            raise ConfigError(f"steps must be >= 1 and arch_lr > 0, got steps={self.steps} arch_lr={self.arch_lr}")


CONFIGS = (ToyConfig,)  # checked by make_experiment's validation before a run starts
ex = make_experiment("paper_toy", globals())


@ex.config
def config() -> None:
    """The paper's illustrative bilevel problem (section 2.3)."""
    order = "second"  # first | second (finite-difference Hessian) | exact (double backward)
    xi = 0.5  # learning rate of the plain-SGD weight step, and the unrolling step of the second order
    steps = 400  # alternating architecture + weight steps
    arch_lr = 0.1  # learning rate of the plain-SGD architecture step


@ex.named_config
def smoke() -> None:
    """A quarter of the steps: alpha is at its fixed point within 1e-3 after 100."""
    steps = 100  # noqa: F841 (Sacred reads the local)


@experiment_main(ex, "alpha")
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, float]:
    result = solve(config["order"], xi=config["xi"], steps=config["steps"], arch_lr=config["arch_lr"])
    for step, (alpha, w) in enumerate(result.path):
        run.log_scalar("alpha", alpha, step)
        run.log_scalar("w", w, step)
    run.info["expected_alpha"] = fixed_point(config["order"], config["xi"])
    return {"alpha": result.alpha, "w": result.w}


if __name__ == "__main__":
    run_commandline(ex)
