"""The test suite's fork server (tests/forkserver.py) keeps `python -m`'s behaviour: exit statuses, output, and a
run past its timeout killed without putting later runs out of step."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_experiment


def test_a_run_past_its_timeout_is_killed_and_the_next_run_still_gets_its_own_answer(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="ran past 3 s"):
        run_experiment("paper_toy", "with", "steps=100000000", runs=tmp_path / "runs", timeout=3)
    done = run_experiment("paper_toy", "with", "steps=5", runs=tmp_path / "runs")
    assert done.returncode == 0 and "Result: " in done.stderr, done.stderr
    refused = run_experiment("paper_toy", "with", "steps=-5", runs=tmp_path / "runs")
    assert refused.returncode == 1 and refused.stderr.strip().endswith("got steps=-5 arch_lr=0.1"), refused.stderr


def test_a_forked_run_prints_what_a_new_interpreter_prints(tmp_path: Path) -> None:
    forked = run_experiment("paper_toy", "print_config", "with", "steps=7", "seed=1", runs=tmp_path / "runs")
    fresh = run_experiment("paper_toy", "print_config", "with", "steps=7", "seed=1", runs=tmp_path / "runs",
                           new_interpreter=True)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    assert "steps = 7" in forked.stdout
