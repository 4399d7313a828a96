"""The toy experiment as a user runs it: result, metrics, and a one-line error for a bad config."""
from __future__ import annotations

import ast

import pytest

from tests.conftest import run_experiment


@pytest.mark.parametrize("order, expected", [("second", 1.0), ("exact", 1.0), ("first", 2.0)])
def test_paper_toy_converges_to_the_closed_form(tmp_path, order: str, expected: float) -> None:
    result = run_experiment("paper_toy", "with", f"order={order}", "xi=0.5", runs=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stderr.split("Result: ")[1].splitlines()[0]
    assert ast.literal_eval(printed)["alpha"] == pytest.approx(expected, abs=1e-3)
    run = result.run_json()
    assert run["status"] == "COMPLETED" and run["result"]["alpha"] == pytest.approx(expected, abs=1e-3)
    assert len(result.metrics()["alpha"]["values"]) == 400


def test_paper_toy_bad_order_is_one_clear_line_and_a_failed_run(tmp_path) -> None:
    result = run_experiment("paper_toy", "with", "order=third", runs=tmp_path)
    assert result.returncode != 0
    assert "order must be one of first, second, exact, got 'third'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.run_json()["status"] == "FAILED"
