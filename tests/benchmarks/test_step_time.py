"""The step-time benchmark on toy sizes: the JSON it writes has every mode, the ratios and the checks."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    exact = {"exact time <= 5.0 x plain", "exact peak memory <= 2.0 x plain"} if task == "cnn" else set()
    assert set(result["checks"]) == {"first <= 1.05 x its floor", "second <= 1.05 x its floor"} | exact
    # The operator counts: a mode runs plain's weight step and more, views are part of the operators
    launches = [result["modes"][mode]["launches"] for mode in ("plain", "first", "second")]
    assert 0 < launches[0] < launches[1] < launches[2]
    assert all(f["ops"] > f["launches"] for f in [*result["modes"].values(), *result["passes"].values()])
    # The floors: plain plus the timed gradient passes of each mode's algorithm.
    passes = {into: f["median_s"] for into, f in result["passes"].items()}
    assert set(passes) == {"weights", "alphas", "both"} and all(t > 0 for t in passes.values())
    plain = result["modes"]["plain"]["median_s"]
    assert result["modes"]["first"]["floor_x_plain"] == pytest.approx((plain + passes["alphas"]) / plain)
    assert result["modes"]["second"]["floor_x_plain"] == pytest.approx(
        (plain + passes["weights"] + passes["both"] + 2 * passes["alphas"]) / plain)
    assert "floor_x_plain" not in result["modes"]["exact"]
    rounds = list(zip(result["modes"]["plain"]["times_s"], *(result["passes"][i]["times_s"] for i in passes)))
    assert result["modes"]["first"]["floor_x_plain_paired"] == pytest.approx(
        sorted((p + a) / p for p, _, a, _ in rounds)[1])  # the median of 3 rounds
    assert "median s" in proc.stdout and "plain" in proc.stdout and "gradient passes" in proc.stdout
    # one collapse measurement at the cost cap of 20 products; the toy RNN's 3 x 5 alphas span fewer dimensions
    # (a softmax ignores a constant added to a row), where Lanczos ends exactly
    hessian = result["hessian"]
    assert (hessian["products"] <= 15 if task == "rnn" else hessian["products"] == 20) and hessian["median_s"] > 0
    assert "one collapse measurement" in proc.stdout
    # the projected 50-epoch search of the paper's data at this batch (toy batch: 4 or 2)
    steps = math.ceil((929_589 // 4 - 1) / 5) if task == "rnn" else 25_000 // 2
    for figures in result["modes"].values():
        assert figures["projection"] == {"epochs": 50, "steps_per_epoch": steps}
        assert figures["projected_search_h"] == pytest.approx(50 * steps * figures["median_s"] / 3600)
    assert result["compiled"] == {} and "projected 50-epoch search" in proc.stdout


@pytest.mark.parametrize("into, weights, alphas", [("weights", True, False), ("alphas", False, True),
                                                   ("both", True, True)])
def test_gradient_passes_ask_for_exactly_their_parameters(monkeypatch: pytest.MonkeyPatch, into: str, weights: bool,
                                                         alphas: bool) -> None:
    from benchmarks.step_time import build_step, parse_args

    asked: list[set[tuple[int, ...]]] = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **kw: asked.append(
        {tuple(p.shape) for p in inputs}) or grad(out, inputs, **kw))
    step, _, _ = build_step(parse_args(["--task", "rnn", *TOY["rnn"], "--threads", "1"]), f"pass:{into}")
    step()
    # toy shapes: the embedding (40, 6) is a weight, the alphas (3 edges, 5 ops) the architecture
    assert asked and ((40, 6) in asked[0]) == weights and ((3, 5) in asked[0]) == alphas


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--task", "rnn", "--modes", "plain,fourth"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown mode 'fourth'" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_times_both_revisions_in_the_same_rounds(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--task", "rnn", *TOY["rnn"], "--threads",
                           "1", "--modes", "plain,first", "--warmup", "1", "--steps-timed", "3", "--compare", "HEAD",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["rev"] == "HEAD" and list(result["modes"]) == ["plain", "first"]
    for f in result["modes"].values():
        assert len(f["this_times_s"]) == len(f["rev_times_s"]) == 3
        assert f["x_rev_paired"] == pytest.approx(sorted(a / b for a, b in zip(f["this_times_s"], f["rev_times_s"]))[1])
        assert 0 < f["this_launches"] < f["this_ops"] and 0 < f["rev_launches"] < f["rev_ops"]
    assert "x HEAD" in proc.stdout and "after the same 5 steps of each mode" in proc.stdout
    assert result["steps_per_mode"] == 5 and result["rev_commit"] == result["this_commit"]
    assert all(f["alphas_rel_diff"] >= 0 and f["weights_rel_diff"] >= 0 for f in result["modes"].values())
    if not result["this_dirty"]:  # the same code on both sides (a clean checkout, as in CI): bit for bit the same
        assert all(f["alphas_rel_diff"] == f["weights_rel_diff"] == 0.0 for f in result["modes"].values())
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert "darts-compare-" not in worktrees  # removed afterwards


@pytest.mark.parametrize("mode, alphas_move", [("plain", False), ("first", True)])
def test_state_difference_sees_one_step(mode: str, alphas_move: bool) -> None:
    from benchmarks.compare import fingerprint, state_difference
    from benchmarks.step_time import build_step, parse_args

    step, _, task = build_step(parse_args(["--task", "rnn", *TOY["rnn"], "--threads", "1"]), mode)
    before = fingerprint(task)
    assert state_difference(before, fingerprint(task)) == {"alphas_rel_diff": 0.0, "weights_rel_diff": 0.0}
    step()
    moved = state_difference(fingerprint(task), before)
    assert (moved["alphas_rel_diff"] > 0) == alphas_move and moved["weights_rel_diff"] > 0
    assert sum(map(len, before["alphas"].values())) == 3 * 5  # every alpha of the toy cell (3 edges, 5 ops)


def test_state_difference_entry_by_entry() -> None:
    from benchmarks.compare import state_difference

    def state(alphas: list[float], weights: dict[str, float]) -> dict:
        return {"alphas": {"a": alphas}, "weights": weights,
                "shapes": {"a": [len(alphas)], **{n: [1] for n in weights}}}

    base = state([1.0, 1e-3], {"w": 100.0, "b": 1e-2})
    # a small tensor's error is its own, not diluted by the largest magnitude
    assert state_difference(base, state([1.0, 2e-3], {"w": 100.0, "b": 2e-2})) == pytest.approx(
        {"alphas_rel_diff": 0.5, "weights_rel_diff": 0.5})
    nan = float("nan")
    assert state_difference(state([1.0, nan], {"w": nan, "b": 1e-2}), state([1.0, nan], {"w": nan, "b": 1e-2})) == {
        "alphas_rel_diff": 0.0, "weights_rel_diff": 0.0}  # the same NaNs: identical
    assert state_difference(base, state([1.0, nan], {"w": 100.0, "b": float("inf")})) == {
        "alphas_rel_diff": 2.0, "weights_rel_diff": 2.0}  # one side diverged, wherever the NaN sits
    assert state_difference(base, state([1.0, 1e-3, 0.0], {"w": 100.0, "b": 1e-2})) == {
        "alphas_rel_diff": None, "weights_rel_diff": None}  # different models
    assert state_difference(base, state([1.0, 1e-3], {"w2": 100.0, "b": 1e-2}))["weights_rel_diff"] is None


def test_each_mode_draws_from_its_own_random_stream() -> None:
    from benchmarks.compare import fingerprint, state_difference
    from benchmarks.step_time import build_step, parse_args

    args = parse_args(["--task", "rnn", *TOY["rnn"], "--threads", "1"])  # the RNN search draws dropout masks
    alone, _, task = build_step(args, "second")
    alone()
    crowded, _, other = build_step(args, "second")
    torch.rand(1000)  # another mode's draws in between
    crowded()
    assert state_difference(fingerprint(task), fingerprint(other)) == {"alphas_rel_diff": 0.0, "weights_rel_diff": 0.0}


def test_compare_with_an_unknown_revision_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", "--task", "rnn", "--compare", "no-such-rev"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--compare no-such-rev: git cannot check it out" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("task, mode", [("rnn", "plain"), ("rnn", "second"), ("cnn", "first")])
def test_compiled_cells_step_as_the_eager_cells(compiled_graphs: list, task: str, mode: str) -> None:
    """`--compile` (the search's compile option): the supernet's cells captured by torch.compile (the graphs run
    through AOT autograd without code generation: `compiled_graphs`) move every parameter as the eager step does."""
    from benchmarks.step_time import build_step, parse_args

    args = parse_args(["--task", task, *TOY[task], "--threads", "1", "--compile", "default"])
    updates = []
    for name in (mode, f"compiled:{mode}"):
        step, _, built = build_step(args, name)
        before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
        step()
        updates.append({n: p.detach() - before[n] for n, p in built.model.named_parameters()})
    assert compiled_graphs, "nothing was compiled"
    assert any(update.abs().max() > 0 for update in updates[1].values())
    for name, eager in updates[0].items():
        torch.testing.assert_close(updates[1][name], eager, rtol=1e-4, atol=1e-7, msg=name)


def test_compiled_modes_are_timed_in_the_same_rounds_as_eager(compiled_graphs: list, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import step_time

    monkeypatch.setattr(step_time, "child_memory", lambda argv, name: {"peak_memory_mb": 2.0,
                                                                       "working_memory_mb": 1.0})
    result = step_time.main(["--task", "rnn", *TOY["rnn"], "--threads", "1", "--modes", "plain,exact", "--warmup",
                             "1", "--steps-timed", "3", "--compile", "default", "--hessian-repeats", "0",
                             "--json", str(tmp_path / "f.json")])
    assert list(result["compiled"]) == ["plain"] and compiled_graphs  # exact has no compiled step
    compiled, eager = result["compiled"]["plain"], result["modes"]["plain"]
    assert compiled["steps"] == 3 and "launches" not in compiled and compiled["first_step_s"] > 0
    assert compiled["x_eager_paired"] == pytest.approx(
        sorted(c / e for c, e in zip(compiled["times_s"], eager["times_s"]))[1])
    assert compiled["projected_search_h"] > 0 and result["config"]["compile"] == "default"
    assert result["hessian"] is None  # --hessian-repeats 0


def test_compile_is_one_line_when_it_cannot_run(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.step_time import parse_args

    for extra in (["--compile", "fast"], ["--compile", "default", "--warmup", "0"],
                  ["--compile", "default", "--compare", "HEAD"]):
        with pytest.raises(SystemExit):
            parse_args(["--task", "rnn", *extra])
        assert "error: --compile takes one of default, reduce-overhead" in capsys.readouterr().err
    assert parse_args(["--task", "rnn", "--compile", "reduce-overhead"]).compile == "reduce-overhead"


def test_projection_counts_the_papers_steps_per_epoch() -> None:
    from benchmarks.step_figures import steps_per_epoch

    # ../shared/reference/original-darts.md: PTB 104 steps an epoch at batch 256, CIFAR-10 391 at batch 64
    assert steps_per_epoch("rnn", 256, 35) == 104 and steps_per_epoch("cnn", 64, None) == 391
    assert steps_per_epoch("rnn", 16, 35) == math.ceil((929_589 // 16 - 1) / 35)


def test_a_side_that_hangs_is_stopped_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import compare

    monkeypatch.setattr(compare, "ANSWER_TIMEOUT_S", 0.5)
    side = compare.Side.__new__(compare.Side)
    side.name = "HEAD"
    side.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    with pytest.raises(SystemExit, match="the HEAD side gave no answer to 'round' within 0.5 s and was stopped"):
        side.ask("round plain")
    assert side.proc.wait(timeout=10) != 0  # killed
    side.proc.stdin.close()
    side.proc.stdout.close()
