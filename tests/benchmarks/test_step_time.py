"""The step-time benchmark on toy sizes: the JSON it writes has every mode, the ratios and the checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TOY = {"rnn": ("--ntoken", "40", "--nhid", "6", "--steps", "2", "--batch", "4", "--bptt", "5"),
       "cnn": ("--C", "2", "--layers", "3", "--steps", "2", "--batch", "2")}


@pytest.mark.parametrize("task", ["rnn", "cnn"])
def test_benchmark_writes_every_mode_with_ratios_and_checks(tmp_path: Path, task: str) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--task", task, *TOY[task], "--threads", "1",
                           "--warmup", "1", "--steps-timed", "3", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert list(result["modes"]) == ["plain", "first", "second", "exact"]
    assert result["torch"] and result["device"].startswith("cpu") and result["config"]["threads"] == 1
    for mode, figures in result["modes"].items():
        assert figures["steps"] == 3 and 0 < figures["min_s"] <= figures["median_s"] <= figures["max_s"], mode
        assert figures["peak_memory_mb"] > figures["working_memory_mb"] >= 0, mode
        assert figures["x_plain"] == pytest.approx(figures["median_s"] / result["modes"]["plain"]["median_s"])
    assert result["modes"]["plain"]["x_plain_paired"] == 1.0
    assert "x_original" not in result["modes"]["plain"]  # toy sizes are not the original's configuration
    assert set(result["checks"]) == {"first <= 1.7 x plain", "second <= 4.0 x plain", "exact <= 4.5 x plain",
                                     "second peak memory <= 1.2 x plain"}
    assert "median s" in proc.stdout and "plain" in proc.stdout


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--task", "rnn", "--modes", "plain,fourth"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown mode 'fourth'" in proc.stderr and "Traceback" not in proc.stderr
