"""`step_time --compare REV`: this tree's steps and another git revision's, timed in the same rounds.

A speed claim on a machine whose speed drifts is an A/B inside one run, and a speed change must leave the numerics
alone: after the rounds both sides report their alphas and weights (every mode took the same steps from the same
seed, each mode on its own random stream), and the table gives the largest difference. Each side is a child process
that builds the modes' steps from its own code (this tree, or a `git worktree` of REV), warms them up and then answers
one request at a time: time one round of every mode, count each mode's operators, or report each mode's state. The
parent asks the two sides in turn, the first side alternating from round to round, so both see the same machine; only
one side runs at a time. The benchmark itself (this module, `step_time`, `op_count`) is this tree's on both sides:
REV must build the steps the way `step_time` does (the task classes' `train_step` and `loss`, their `engine` with
its `weights` and `alphas`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
# The longest a side may take for one answer (building and warming every mode, or one round) before it counts as hung
ANSWER_TIMEOUT_S = 3600.0


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
        # One answer line per request, so nothing waits in the reader's buffer: the pipe says when it comes
        if not select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)[0]:
            self.proc.kill()
            raise SystemExit(f"step_time: the {self.name} side gave no answer to {request.split()[0]!r} within "
                             f"{ANSWER_TIMEOUT_S:g} s and was stopped; run that side alone to see where it hangs")
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


def fingerprint(task: Any) -> dict[str, dict[str, Any]]:
    """The state the steps left, by parameter name: each alpha tensor's values, and each weight tensor's projection
    on a random direction of its own (seeded by its name: a checksum that moves with any change of the tensor)."""
    def values(tensor: Any) -> Any:
        return tensor.detach().cpu().double()

    def projection(name: str, tensor: Any) -> float:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return float((values(tensor) * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)).sum())

    return {"alphas": {n: values(a).flatten().tolist() for n, a in task.engine.alphas},
            "weights": {n: projection(n, w) for n, w in task.engine.weights},
            "shapes": {n: list(p.shape) for n, p in [*task.engine.alphas, *task.engine.weights]}}


def _relative(x: float, y: float) -> float:
    """|x - y| / max(|x|, |y|): 0 for equal values (NaN and infinities included), 2 where one side alone is not
    finite (the largest a finite pair can give)."""
    if x == y or (math.isnan(x) and math.isnan(y)):
        return 0.0
    if not (math.isfinite(x) and math.isfinite(y)):
        return 2.0
    return abs(x - y) / max(abs(x), abs(y))


def state_difference(this: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The largest relative difference, entry by entry, of the two sides' alphas and weight projections (0:
    bit-identical); None for both when the two sides' parameters differ in names or shapes (different models)."""
    if this["shapes"] != other["shapes"]:
        return {"alphas_rel_diff": None, "weights_rel_diff": None}
    alphas = [_relative(x, y) for n in this["alphas"] for x, y in zip(this["alphas"][n], other["alphas"][n])]
    weights = [_relative(this["weights"][n], other["weights"][n]) for n in this["weights"]]
    return {"alphas_rel_diff": max(alphas, default=0.0), "weights_rel_diff": max(weights, default=0.0)}


def print_comparison(result: dict[str, Any]) -> None:
    rev = result["rev"]
    print(f"this tree against {rev}, the same rounds (x {rev}: the median over rounds of this / {rev})")
    print(f"{'mode':<8}{'this s':>9}{rev[:12] + ' s':>16}{'x ' + rev[:10]:>14}{'launches':>10}{rev[:10]:>12}"
          f"{'alphas diff':>14}{'weights diff':>14}")
    def diff(value: float | None) -> str:
        return f"{'models differ' if value is None else f'{value:.1e}':>14}"

    for mode, f in result["modes"].items():
        print(f"{mode:<8}{f['this_median_s']:>9.3f}{f['rev_median_s']:>16.3f}{f['x_rev_paired']:>14.2f}"
              f"{f['this_launches']:>10}{f['rev_launches']:>12}{diff(f['alphas_rel_diff'])}"
              f"{diff(f['weights_rel_diff'])}")
    print(f"diff: the two sides' alphas and weights after the same {result['steps_per_mode']} steps of each mode from "
          "the same seed, the largest relative difference (0: bit-identical; on a GPU some kernels are not "
          "deterministic)")


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


def commits(rev: str) -> dict[str, Any]:
    """The commits the two sides ran, and whether this tree had uncommitted changes to tracked files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    return {"this_commit": git("rev-parse", "HEAD"), "this_dirty": bool(git("status", "--porcelain",
                                                                             "--untracked-files=no")),
            "rev_commit": git("rev-parse", rev)}


def compare_sides(args: Any, names: list[str]) -> dict[str, Any] | None:
    """`step_time --compare REV`, or one side of it (`--serve`)."""
    from benchmarks.op_count import count_ops
    from benchmarks.step_time import DEFAULTS, device_name, warm_steps, write_json

    if args.serve:
        serve(*warm_steps(args, names)[:3], count_ops)
        return None
    config = {k: getattr(args, k) for k in DEFAULTS[args.task]}
    side_argv = ["--task", args.task, "--modes", ",".join(names), "--device", args.device, "--threads",
                 str(args.threads), "--precision", args.precision, "--warmup", str(args.warmup),
                 *(f"--{k}={v}" for k, v in config.items())]
    result = {"task": args.task, "device": device_name(args.device), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "config": config, **commits(args.compare),
              "steps_per_mode": args.warmup + args.steps_timed + 1,  # warm-up, the rounds, the counted step
              **compare(side_argv, args.compare, names, args.steps_timed)}
    print_comparison(result)
    write_json(args, result)
    return result
