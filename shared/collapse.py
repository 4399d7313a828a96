"""Collapse diagnostics and early stopping for any search: the curvature of the validation loss in the alphas, the
entropy of each edge's op distribution, and the published stopping rules.

- `top_eigenvalue`: the largest eigenvalue of a symmetric operator given only its products (Lanczos with full
  reorthogonalisation; RobustDARTS, Zela et al. 2020, reads it from the Hessian of the validation loss w.r.t. the
  alphas, which `shared.bilevel.Bilevel.alpha_hessian_product` supplies).
- `edge_entropy`: per edge, the entropy of softmax(alpha) over its ops.
- `EarlyStop`: `robust` (RobustDARTS: the eigenvalue's local average grew by more than `factor` over the one `delta`
  measurements earlier: stop, and return the genotype of that earlier epoch) and `skip` (DARTS+, Liang et al. 2019:
  stop once the derived cell holds `skips` or more parameter-free ops of the collapsing kind).

The rules read the loop's epoch records (metrics by name), so they know no search space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from shared.errors import ConfigError
from shared.validation import check_choice, check_fields

EARLY_STOP_RULES = ("off", "robust", "skip")
EIGENVALUE = "hessian_eigenvalue"  # the metric the robust rule reads


@dataclass(frozen=True)
class CollapseConfig:
    """How often the curvature is measured, at what cost, and which stopping rule ends the search."""

    hessian_every: int = 2  # measure the dominant eigenvalue every N epochs (0: never); RobustDARTS: 2
    hessian_iterations: int = 20  # the cost cap: at most this many Hessian-vector products per measurement
    hessian_tol: float = 1e-3  # stop iterating once the residual ||H y - l y|| / |l| is below this
    early_stop: str = "off"  # off | robust (RobustDARTS eigenvalue rule) | skip (DARTS+ parameter-free op count)
    early_stop_factor: float = 1.3  # robust: stop when the local average grew by more than this factor
    early_stop_start: int = 10  # robust: the earlier (returned) epoch must be at least this one
    early_stop_window: int = 5  # robust: measurements per local average
    early_stop_delta: int = 4  # robust: compare with the local average this many measurements earlier
    early_stop_skips: int = 2  # skip: stop once the derived cell holds this many (CNN: skip_connect in the normal
    # cell; RNN: identity)

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("early_stop", self.early_stop, EARLY_STOP_RULES)
        for name, low in (("hessian_every", 0), ("hessian_iterations", 1), ("early_stop_start", 0),
                          ("early_stop_window", 1), ("early_stop_delta", 1), ("early_stop_skips", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("hessian_tol", "early_stop_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.early_stop == "robust" and self.hessian_every == 0:
            raise ConfigError("early_stop=robust reads the Hessian eigenvalue: set hessian_every to 1 or more")

    def measures(self, epoch: int) -> bool:
        """Whether the eigenvalue is measured after `epoch` (1-based)."""
        return self.hessian_every > 0 and epoch % self.hessian_every == 0


# ---- curvature ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Eigen:
    value: float  # the largest eigenvalue estimate (a Ritz value)
    iterations: int  # operator products spent
    residual: float  # ||H y - value y|| / |value| for the unit Ritz vector y (0 when value is 0 and exact)


def top_eigenvalue(product: Callable[[Tensor], Tensor], dim: int, iterations: int, tol: float,
                   generator: torch.Generator | None = None) -> Eigen:
    """The largest (algebraic) eigenvalue of the symmetric operator `product` on R^dim by Lanczos.

    Full reorthogonalisation keeps the basis orthogonal, so `iterations >= dim` returns the exact top eigenvalue up
    to rounding; fewer stop once the residual of the top Ritz pair, beta_k |s_k| (s: the Ritz vector in the Krylov
    basis), falls below `tol` times the Ritz value. The recurrence runs in float64 whatever `product` computes in.
    """
    q = torch.randn(dim, generator=generator, dtype=torch.float64)
    basis = [q / torch.linalg.vector_norm(q)]
    diagonal: list[float] = []
    off: list[float] = []
    value, residual = 0.0, math.inf
    for k in range(min(iterations, dim)):
        w = product(basis[-1]).to(torch.float64)
        diagonal.append(float(w @ basis[-1]))
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthogonal to working precision
            w = w - stacked.T @ (stacked @ w)
        beta = float(torch.linalg.vector_norm(w))
        tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off:
            sub = torch.tensor(off, dtype=torch.float64)
            tridiagonal += torch.diag(sub, 1) + torch.diag(sub, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        value = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1])) / max(abs(value), torch.finfo(torch.float64).tiny)
        if residual <= tol or beta <= 1e-12 * max(abs(value), 1.0):  # converged, or an invariant subspace
            return Eigen(value, k + 1, residual)
        off.append(beta)
        basis.append(w / beta)
    return Eigen(value, min(iterations, dim), residual)


def eigen_metrics(eigen: Eigen) -> dict[str, float]:
    """An estimate as epoch metrics: the eigenvalue (what the robust rule reads), its cost and residual."""
    return {EIGENVALUE: eigen.value, "hessian_iterations": float(eigen.iterations), "hessian_residual": eigen.residual}


def edge_entropy(probs: Tensor) -> Tensor:
    """(edges, ops) rows of op probabilities -> (edges,) entropies in nats (ln(ops) for a uniform edge)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1) + 0.0  # + 0.0: no -0.0


def alpha_metrics(softmaxes: dict[str, Tensor]) -> dict[str, float]:
    """The mean and the smallest edge entropy over every edge of every alpha tensor (empty for a training)."""
    if not softmaxes:
        return {}
    entropies = torch.cat([edge_entropy(probs.double()) for probs in softmaxes.values()])
    return {"edge_entropy": float(entropies.mean()), "edge_entropy_min": float(entropies.min())}


# ---- stopping rules ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StopDecision:
    rule: str  # robust | skip
    epoch: int  # the epoch after which the search stopped
    genotype_epoch: int  # the epoch whose genotype the search returns
    reason: str  # one line: what the rule saw

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "epoch": self.epoch, "genotype_epoch": self.genotype_epoch, "reason": self.reason}


class EarlyStop:
    """The configured stopping rule over the epoch records so far: `check(epochs, metrics)` with one entry per epoch
    (1-based epoch numbers, metrics by name) returns a `StopDecision` or None. `skip_metric` names the count of
    collapsing ops in the derived cell (CNN `skip_connect_normal`, RNN `identity_ops`)."""

    def __init__(self, config: CollapseConfig, skip_metric: str) -> None:
        self.config, self.skip_metric = config, skip_metric

    def check(self, epochs: Sequence[int], metrics: Sequence[dict[str, float]]) -> StopDecision | None:
        if self.config.early_stop == "robust":
            return self._robust(epochs, metrics)
        if self.config.early_stop == "skip":
            return self._skip(epochs[-1], metrics[-1])
        return None

    def _skip(self, epoch: int, metrics: dict[str, float]) -> StopDecision | None:
        count = metrics.get(self.skip_metric)
        if count is None or count < self.config.early_stop_skips:
            return None
        return StopDecision("skip", epoch, epoch, f"{self.skip_metric} reached {count:g} "
                                                  f"(early_stop_skips={self.config.early_stop_skips})")

    def _robust(self, epochs: Sequence[int], metrics: Sequence[dict[str, float]]) -> StopDecision | None:
        """RobustDARTS: local averages over `window` consecutive measurements, each standing for its middle epoch;
        stop when the latest exceeds `factor` times the one `delta` measurements earlier, provided that earlier
        one's epoch is at least `start` (and positive: a growth factor of a non-positive curvature means nothing)."""
        config = self.config
        measured = [(epoch, m[EIGENVALUE]) for epoch, m in zip(epochs, metrics) if EIGENVALUE in m]
        if not measured or measured[-1][0] != epochs[-1]:  # decide only right after a measurement
            return None
        window, delta = config.early_stop_window, config.early_stop_delta
        if len(measured) < window + delta:
            return None
        values = [value for _, value in measured]
        current = sum(values[-window:]) / window
        earlier = sum(values[-window - delta:-delta]) / window
        earlier_epoch = measured[-delta - window + window // 2][0]  # the middle epoch of the earlier window
        if earlier_epoch < config.early_stop_start or earlier <= 0 or current <= config.early_stop_factor * earlier:
            return None
        return StopDecision("robust", epochs[-1], earlier_epoch,
                            f"the eigenvalue's local average grew {current / earlier:.3g}x (from {earlier:.4g} around "
                            f"epoch {earlier_epoch} to {current:.4g}; early_stop_factor={config.early_stop_factor})")
