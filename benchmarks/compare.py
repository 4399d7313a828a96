"""`step_time --compare REV`: this tree's steps and another git revision's, timed in the same rounds.

A speed claim on a machine whose speed drifts is an A/B inside one run, and a speed change must leave the numerics
alone: after the rounds both sides report their alphas and weights (every mode took the same steps from the same
seed), and the table gives the largest difference. Each side is a child process that builds the
modes' steps from its own code (this tree, or a `git worktree` of REV), warms them up and then answers one request at
a time: time one round of every mode, or count each mode's operators. The parent asks the two sides in turn, the
first side alternating from round to round, so both see the same machine; only one side runs at a time. The
benchmark itself (this module, `step_time`, `op_count`) is this tree's on both sides: REV must build the steps the
way `step_time` does (the task classes' `train_step` and `loss`).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of `rev`, removed afterwards; one line if git does not know it."""
    folder = Path(tempfile.mkdtemp(prefix="darts-compare-"))
    proc = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder / "tree"), rev],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise SystemExit(f"step_time: --compare {rev}: git cannot check it out: {why}")
    try:
        yield folder / "tree"
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder / "tree")],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


class Side:
    """A child serving rounds of this benchmark over the code at `root`."""

    def __init__(self, name: str, root: Path, argv: list[str], bench: Path) -> None:
        self.name = name
        paths = [str(bench), str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        # From `bench`, the benchmark's folder (-m puts the working folder first on the path), the rest from root
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.step_time", *argv, "--serve"], cwd=bench,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            code = Path(self.ask("ready")["code"])
            if code != root.resolve():  # the side must time its own revision's packages
                raise SystemExit(f"step_time: the {name} side imported its packages from {code}, not {root}")
        except BaseException:
            self.proc.kill()
            raise

    def ask(self, request: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"step_time: the {self.name} side ended (exit {self.proc.wait()}); see its error above")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait()


def compare(argv: list[str], rev: str, modes: list[str], rounds: int) -> dict[str, Any]:
    """Seconds per step of each mode on both sides, the per-round ratio this / REV and the operator counts."""
    with tempfile.TemporaryDirectory() as bench, checkout(rev) as tree:
        shutil.copytree(REPO / "benchmarks", Path(bench) / "benchmarks",  # its modules, not results/
                        ignore=lambda _, names: [n for n in names if not n.endswith(".py")])
        sides: list[Side] = []
        try:
            sides += [Side("this tree's", REPO, argv, Path(bench)), Side(rev, tree, argv, Path(bench))]
            times: list[dict[str, list[float]]] = [{mode: [] for mode in modes} for _ in sides]
            for round_ in range(rounds):
                order = modes[round_ % len(modes):] + modes[:round_ % len(modes)]
                for i in (0, 1) if round_ % 2 == 0 else (1, 0):
                    for mode, seconds in sides[i].ask("round " + ",".join(order)).items():
                        times[i][mode].append(seconds)
            counts = [side.ask("count") for side in sides]
            states = [side.ask("state") for side in sides]
        finally:
            for side in sides:
                side.close()
    return {"rev": rev, "modes": {mode: {**state_difference(states[0][mode], states[1][mode]),
        "this_median_s": statistics.median(times[0][mode]), "rev_median_s": statistics.median(times[1][mode]),
        "x_rev_paired": statistics.median(a / b for a, b in zip(times[0][mode], times[1][mode])),
        "this_times_s": times[0][mode], "rev_times_s": times[1][mode],
        "this_launches": counts[0][mode]["launches"], "rev_launches": counts[1][mode]["launches"],
        "this_ops": counts[0][mode]["ops"], "rev_ops": counts[1][mode]["ops"]} for mode in modes}}


def fingerprint(task: Any) -> dict[str, list[float]]:
    """The state the steps left: every alpha, and each weight tensor's projection on a fixed random direction (a
    checksum that moves with any change of the tensor)."""
    generator = torch.Generator().manual_seed(0)
    weights = [p.detach().cpu().double() for _, p in task.engine.weights]
    return {"alphas": [v for _, a in task.engine.alphas for v in a.detach().cpu().double().flatten().tolist()],
            "weights": [float((w * torch.randn(w.shape, generator=generator, dtype=torch.float64)).sum())
                        for w in weights]}


def state_difference(this: dict[str, list[float]], other: dict[str, list[float]]) -> dict[str, float]:
    """The largest difference of the two sides' alphas and weight projections, over the largest magnitude."""

    def relative(a: list[float], b: list[float]) -> float:
        if len(a) != len(b):
            return float("inf")  # the revisions build different models
        scale = max(map(abs, a + b), default=0.0) or 1.0
        return max((abs(x - y) for x, y in zip(a, b)), default=0.0) / scale

    return {"alphas_rel_diff": relative(this["alphas"], other["alphas"]),
            "weights_rel_diff": relative(this["weights"], other["weights"])}


def print_comparison(result: dict[str, Any]) -> None:
    rev = result["rev"]
    print(f"this tree against {rev}, the same rounds (x {rev}: the median over rounds of this / {rev})")
    print(f"{'mode':<8}{'this s':>9}{rev[:12] + ' s':>16}{'x ' + rev[:10]:>14}{'launches':>10}{rev[:10]:>12}"
          f"{'alphas diff':>14}{'weights diff':>14}")
    for mode, f in result["modes"].items():
        print(f"{mode:<8}{f['this_median_s']:>9.3f}{f['rev_median_s']:>16.3f}{f['x_rev_paired']:>14.2f}"
              f"{f['this_launches']:>10}{f['rev_launches']:>12}{f['alphas_rel_diff']:>14.1e}"
              f"{f['weights_rel_diff']:>14.1e}")
    print(f"diff: the two sides' alphas and weights after the same {result['steps_per_mode']} steps of each mode from "
          "the same seed (largest difference over the largest magnitude; 0 = bit-identical)")


def serve(steps: dict[str, Any], seconds: Any, tasks: dict[str, Any], count_ops: Any) -> None:
    """The child's loop: answer `ready`, `round MODES` (seconds of one step each, in that order), `count` (one more
    step of each mode, its operators counted) and `state` (each mode's `fingerprint`)."""
    for line in sys.stdin:
        request, _, modes = line.strip().partition(" ")
        if request == "round":
            answer = {mode: seconds(steps[mode]) for mode in modes.split(",")}
        elif request == "count":
            answer = {mode: count_ops(step) for mode, step in steps.items()}
        elif request == "state":
            answer = {mode: fingerprint(task) for mode, task in tasks.items()}
        else:
            import shared

            answer = {"code": str(Path(shared.__file__).resolve().parent.parent)}
        print(json.dumps(answer), flush=True)


def compare_sides(args: Any, names: list[str]) -> dict[str, Any] | None:
    """`step_time --compare REV`, or one side of it (`--serve`)."""
    from benchmarks.op_count import count_ops
    from benchmarks.step_time import DEFAULTS, device_name, warm_steps, write_json

    if args.serve:
        serve(*warm_steps(args, names), count_ops)
        return None
    config = {k: getattr(args, k) for k in DEFAULTS[args.task]}
    side_argv = ["--task", args.task, "--modes", ",".join(names), "--device", args.device, "--threads",
                 str(args.threads), "--precision", args.precision, "--warmup", str(args.warmup),
                 *(f"--{k}={v}" for k, v in config.items())]
    result = {"task": args.task, "device": device_name(args.device), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "config": config,
              "steps_per_mode": args.warmup + args.steps_timed + 1,  # warm-up, the rounds, the counted step
              **compare(side_argv, args.compare, names, args.steps_timed)}
    print_comparison(result)
    write_json(args, result)
    return result
