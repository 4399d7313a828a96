"""Collapse diagnostics: the Lanczos eigenvalue against closed forms and autograd Hessians, edge entropy, and the
stopping rules on scripted sequences."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from cnn_darts.data import batches
from rnn_darts.data import load_corpus
from rnn_darts.network import DROPOUTS
from rnn_darts.search import RNNSearchTask, SearchConfig
from rnn_darts.supernet import SupernetConfig
from shared import checkpoint
from shared.collapse import CollapseConfig, EarlyStop, edge_entropy, top_eigenvalue
from shared.errors import ConfigError
from tests.cnn_darts.test_search import make_task as make_cnn_task
from tests.rnn_darts.test_search import TINY_MODEL, write_corpus
from tests.rnn_darts.test_search import make_task as make_rnn_task


def known_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with exactly these eigenvalues (a random orthogonal basis)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def test_lanczos_finds_the_largest_eigenvalue_even_when_a_negative_one_is_larger_in_magnitude() -> None:
    # plain power iteration would return -7 here; the largest eigenvalue is 3
    values = [-7.0, 3.0, 2.5, 1.0, 0.5, 0.0, 0.0, -0.2, -1.0, -3.0]
    matrix = known_spectrum(values)
    eigen = top_eigenvalue(lambda v: matrix @ v, len(values), iterations=len(values), tol=1e-12)
    assert eigen.value == pytest.approx(3.0, rel=1e-10)
    assert eigen.residual < 1e-8 and eigen.iterations <= len(values)


def test_lanczos_stops_at_the_tolerance_or_the_cap_and_reports_the_true_residual() -> None:
    values = [10.0] + [1.0 - k / 200 for k in range(199)]  # a well-separated top eigenvalue
    matrix = known_spectrum(values, seed=1)
    eigen = top_eigenvalue(lambda v: matrix @ v, 200, iterations=50, tol=1e-6)
    assert eigen.iterations < 50 and eigen.residual <= 1e-6
    assert eigen.value == pytest.approx(10.0, rel=1e-6)
    capped = top_eigenvalue(lambda v: matrix @ v, 200, iterations=2, tol=1e-12)
    assert capped.iterations == 2 and capped.residual > 1e-12
    # the reported residual bounds the distance to the spectrum (Bauer-Fike for symmetric matrices)
    assert abs(capped.value - 10.0) <= capped.residual * abs(capped.value) + 1e-12


def exact_alpha_hessian(task, loss_fn) -> torch.Tensor:
    """The full Hessian of loss_fn in the flattened alphas at the task's weights, by autograd."""
    engine = task.engine
    names = [n for n, _ in engine.alphas]
    shapes = [a.shape for _, a in engine.alphas]
    weights = {n: p.detach() for n, p in engine.weights}
    buffers = {n: b.clone() for n, b in task.model.named_buffers()}

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([math.prod(s) for s in shapes])
        alphas = {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}
        tensors = {**buffers, **weights, **alphas}
        return loss_fn(lambda *args: functional_call(task.model, tensors, args))

    flat = torch.cat([a.detach().reshape(-1) for _, a in engine.alphas])
    return torch.autograd.functional.hessian(loss_of, flat)


def double(task):
    task.model.double()
    return task


@pytest.mark.parametrize("space", ["rnn", "cnn"])
def test_the_measured_eigenvalue_is_the_largest_eigenvalue_of_the_exact_alpha_hessian(tmp_path, space: str) -> None:
    """Both supernets (tiny, float64, no dropout so that the reference sees the same function): the estimate equals
    the top eigenvalue of the autograd Hessian within 1e-3 relative."""
    if space == "rnn":
        corpus = load_corpus(write_corpus(tmp_path / "corpus"))
        torch.manual_seed(0)
        model = SupernetConfig(ntoken=corpus.ntoken, **{**TINY_MODEL, **dict.fromkeys(DROPOUTS, 0.0)})
        config = SearchConfig(order="first", batch_size=4, eval_batch_size=3, bptt=6)
        task = double(RNNSearchTask(corpus, model, config, torch.device("cpu"), 0))
        xa, ya = task.arch_data[:6], task.arch_data[1:7]
        loss = task.loss(xa, ya, task.model.init_hidden(task.config.batch_size).double(), False)
    else:
        task = double(make_cnn_task("first"))
        x, y = next(batches(*task.arch_data, 8, torch.Generator(), shuffle=False, augment=False))
        loss = task.loss(x.double(), y)
    task.model.train()
    dim = sum(a.numel() for _, a in task.engine.alphas)
    reference = torch.linalg.eigvalsh(exact_alpha_hessian(task, loss))[-1].item()
    eigen = task.engine.alpha_hessian_eigen(loss, iterations=dim, tol=1e-10)
    assert eigen.value == pytest.approx(reference, rel=1e-3)
    assert abs(reference) > 1e-8  # a real curvature, not two zeros agreeing


def test_a_measurement_changes_no_weight_buffer_optimizer_or_random_stream(tmp_path) -> None:
    task = make_cnn_task("second")
    before = checkpoint.rng_state(), {k: v.clone() for k, v in task.model.state_dict().items()}
    metrics = task.curvature(2)
    after = checkpoint.rng_state(), task.model.state_dict()
    assert set(metrics) == {"hessian_eigenvalue", "hessian_iterations", "hessian_residual"}
    assert torch.equal(before[0]["torch"], after[0]["torch"])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert task.curvature(1) == {}  # hessian_every=2: odd epochs are not measured


def test_a_measured_rnn_search_trains_bit_identically_to_an_unmeasured_one(tmp_path) -> None:
    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    runs = []
    for every in (0, 1):
        task = make_rnn_task(corpus, "second")
        task.collapse = CollapseConfig(hessian_every=every)
        metrics = task.train_epoch(1)
        runs.append((metrics, task.model.state_dict()))
    (plain, plain_state), (measured, measured_state) = runs
    assert "hessian_eigenvalue" in measured and "hessian_eigenvalue" not in plain
    assert all(torch.equal(plain_state[k], measured_state[k]) for k in plain_state)


def test_edge_entropy_is_ln_k_for_a_uniform_edge_and_zero_for_a_one_hot_edge() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(edge_entropy(probs), torch.tensor([math.log(4), 0.0, math.log(2)]))


# ---- stopping rules on scripted sequences -------------------------------------------------------------------------
def scripted(values: dict[int, dict[str, float]], epochs: int) -> tuple[list[int], list[dict[str, float]]]:
    return list(range(1, epochs + 1)), [values.get(e, {}) for e in range(1, epochs + 1)]


def first_stop(rule: EarlyStop, values: dict[int, dict[str, float]], epochs: int):
    """The decision at the first epoch whose check fires, as the loop sees the history grow."""
    all_epochs, all_metrics = scripted(values, epochs)
    for n in range(1, epochs + 1):
        decision = rule.check(all_epochs[:n], all_metrics[:n])
        if decision is not None:
            return decision
    return None


def eigenvalues(curve: list[float], every: int = 2) -> dict[int, dict[str, float]]:
    return {every * (k + 1): {"hessian_eigenvalue": v} for k, v in enumerate(curve)}


def test_robust_rule_fires_exactly_when_the_local_average_grows_past_the_factor() -> None:
    """Measured every 2 epochs; windows of 5, compared 4 measurements apart. Flat at 1.0 through epoch 40, then the
    curve jumps: the first local average above 1.3 x the one 4 measurements earlier stops the search, and the
    returned epoch is the middle of that earlier window."""
    curve = [1.0] * 20 + [3.0] * 10  # epochs 2..40 flat, 42..60 at 3
    rule = EarlyStop(CollapseConfig(early_stop="robust"), "skip_connect_normal")
    decision = first_stop(rule, eigenvalues(curve), 60)
    # window ending at measurement 22 (epoch 44): [1,1,1,3,3] mean 1.8 > 1.3 x 1.0; at measurement 21 (epoch 42)
    # [1,1,1,1,3] mean 1.4 > 1.3 already: the earlier window is measurements 13..17, middle 15 = epoch 30
    assert decision is not None and decision.rule == "robust"
    assert decision.epoch == 42 and decision.genotype_epoch == 30


def test_robust_rule_waits_for_the_start_epoch_and_ignores_slow_growth() -> None:
    rule = EarlyStop(CollapseConfig(early_stop="robust"), "skip_connect_normal")
    # a jump at measurement 5 (epoch 10): without a start epoch the rule fires at epoch 18 (the 9th measurement,
    # the first with two windows 4 apart) and returns epoch 6; with early_stop_start=10 it waits until the earlier
    # window's middle is epoch 10, at epoch 22, where the growth (5 / 3.4 = 1.47) still exceeds 1.3
    early = eigenvalues([1.0] * 4 + [5.0] * 20)
    anytime = first_stop(EarlyStop(CollapseConfig(early_stop="robust", early_stop_start=0), "x"), early, 48)
    assert (anytime.epoch, anytime.genotype_epoch) == (18, 6)
    decision = first_stop(rule, early, 48)
    assert (decision.epoch, decision.genotype_epoch) == (22, 10)
    # 1.05x per measurement: 4 measurements apart is 1.05^4 = 1.22 < 1.3, never fires
    slow = [1.05 ** k for k in range(25)]
    assert first_stop(rule, eigenvalues(slow), 50) is None
    # and 1.07x per measurement (1.07^4 = 1.31 > 1.3) fires once the earlier window's middle reaches epoch 10
    fast = [1.07 ** k for k in range(25)]
    decision = first_stop(rule, eigenvalues(fast), 50)
    assert decision is not None and decision.genotype_epoch == 10 and decision.epoch == 22


def test_robust_rule_decides_only_right_after_a_measurement() -> None:
    rule = EarlyStop(CollapseConfig(early_stop="robust", early_stop_start=0), "skip_connect_normal")
    epochs, metrics = scripted(eigenvalues([1.0] * 5 + [9.0] * 5), 21)
    assert rule.check(epochs[:20], metrics[:20]) is not None  # epoch 20 was measured
    assert rule.check(epochs, metrics) is None  # epoch 21 was not


def test_skip_rule_fires_at_the_first_epoch_with_enough_parameter_free_ops() -> None:
    counts = {1: 0.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 3.0}
    rule = EarlyStop(CollapseConfig(early_stop="skip"), "skip_connect_normal")
    decision = first_stop(rule, {e: {"skip_connect_normal": c} for e, c in counts.items()}, 5)
    assert (decision.rule, decision.epoch, decision.genotype_epoch) == ("skip", 4, 4)
    strict = EarlyStop(CollapseConfig(early_stop="skip", early_stop_skips=3), "identity_ops")
    assert first_stop(strict, {e: {"identity_ops": c} for e, c in counts.items()}, 5).epoch == 5
    assert first_stop(EarlyStop(CollapseConfig(), "identity_ops"),
                      {e: {"identity_ops": 8.0} for e in range(1, 6)}, 5) is None  # early_stop=off


@pytest.mark.parametrize("changes, key", [
    ({"early_stop": "sometimes"}, "early_stop"), ({"hessian_every": -1}, "hessian_every"),
    ({"hessian_iterations": 0}, "hessian_iterations"), ({"early_stop_factor": 0.0}, "early_stop_factor"),
    ({"early_stop_skips": 1.5}, "early_stop_skips"), ({"early_stop": "robust", "hessian_every": 0}, "hessian_every"),
    ({"hessian_tol": float("nan")}, "hessian_tol"),
])
def test_bad_collapse_config_is_one_line_naming_the_key(changes, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as info:
        CollapseConfig(**changes)
    assert "\n" not in str(info.value)
