"""The toy experiment as a user runs it: result, metrics, and a one-line error for a bad config."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_experiment


@pytest.mark.parametrize("order, expected", [("second", 1.0), ("exact", 1.0), ("first", 2.0)])
def test_paper_toy_converges_to_the_closed_form(tmp_path, order: str, expected: float) -> None:
    result = run_experiment("paper_toy", "with", f"order={order}", "xi=0.5", runs=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stderr.split("Result: ")[1].splitlines()[0]
    assert float(printed) == pytest.approx(expected, abs=1e-3)  # the headline: alpha
    run = result.run_json()
    assert run["status"] == "COMPLETED"
    assert result.result()["alpha"] == run["result"] == pytest.approx(expected, abs=1e-3)
    assert len(result.metrics()["alpha"]["values"]) == 400


def test_paper_toy_bad_order_is_one_clear_line_before_any_run(tmp_path) -> None:
    result = run_experiment("paper_toy", "with", "order=third", runs=tmp_path)
    assert result.returncode != 0
    assert "order must be one of first, second, exact, got 'third'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(p.name.isdigit() for p in tmp_path.iterdir())  # refused before a run folder is made


def test_activation_toy_logs_the_four_rewards_the_controllers_path_and_both_answers(tmp_path) -> None:
    result = run_experiment("activation_toy", "with", "controller_steps=200", "darts_steps=200", runs=tmp_path)
    assert result.returncode == 0, result.stderr
    run, metrics = result.run_json(), result.metrics()
    info = json.loads((result.run_dir() / "info.json").read_text())
    assert set(info["rewards"]) == {"(linear, linear)", "(linear, sigmoid)", "(sigmoid, linear)",
                                    "(sigmoid, sigmoid)"}
    assert metrics["reinforce_p_linear_linear"]["steps"] == list(range(1, 201))
    outcome = result.result()
    assert run["result"] is None  # no single headline number
    assert outcome["reinforce"]["architecture"] == "(linear, linear)"
    assert outcome["reinforce"]["probability"] > 0.95
    for order in ("first", "second", "exact"):
        assert outcome["darts"][order]["architecture"] == "(linear, linear)", order
        assert len(metrics[f"darts_{order}_linear_layer1"]["values"]) == 200


def test_activation_toy_bad_orders_is_one_line(tmp_path) -> None:
    result = run_experiment("activation_toy", "with", "orders=['plain']", runs=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "orders must be a non-empty list of first, second, exact" in result.stderr
