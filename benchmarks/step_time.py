"""Seconds per search step, per mode, on synthetic inputs of the real shapes; the figures of README and issue 6.

    python -m benchmarks.step_time --task rnn                      # CPU, 2 threads, batch 16, 300/300, 10k words
    python -m benchmarks.step_time --task cnn --json out.json      # C 16, 8 cells, batch 16
    python -m benchmarks.step_time --task cnn --device cuda --batch 64
    python -m benchmarks.step_time --task rnn --device cuda --batch 256 --compile reduce-overhead   # CUDA graphs

A step is what the search's `train_step` does: the architecture step of the mode (none for plain) followed by the
weight step. Times are taken round-robin over the modes in one process (a drifting machine slows all alike); peak
memory (CPU: peak RSS; CUDA: peak allocated) comes from one process per mode, so each mode's peak is its own; the
working memory is that peak less the process's peak before the first step (Python, torch, model, data). The table
gives the median after warm-up, each mode's ratio to plain (of medians, and the median of per-round ratios) and, on
CPU at the default config, the ratio to the original DARTS code measured on the same kind of machine
(../shared/reference/original-darts.md).

Each mode's floor is measured in the same rounds: a mode runs the real weight step (= plain) plus gradient passes
(forward + backward into the weights, the alphas or both; `FLOORS`), and no implementation of the same algorithm
can take less than their sum. A mode's ratio over its floor is the engine's own overhead; a target below the floor
is out of reach for the algorithm on that machine and config, whatever the engine does.

`--compile MODE` also times every mode but exact with the search's `compile=MODE` (the supernet's cells compiled by
torch.compile; reduce-overhead replays them as CUDA graphs) in the same rounds, each compiled step's ratio to its eager
one and the seconds of its first step, which compiles. Every mode's median gives the projected search of `--epochs`
epochs (50, the paper's) of the paper's data at this batch: the steps alone, no evaluation.

After the rounds, the cost of one collapse measurement (the dominant eigenvalue of the alpha Hessian, as a search
records it every `hessian_every` epochs) is timed at its cap of `hessian_iterations` Hessian-vector products, in
seconds and in plain steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.op_count import count_ops
from benchmarks.step_figures import (FLOORS, add_compiled_ratios, add_floors, add_projection, add_ratios,
                                     print_table, steps_per_epoch, targets)
from shared.bilevel import LossFn

Step = Callable[[], None]

MODES = ("plain", "first", "second", "exact")
# The gradient passes the modes are made of: forward + backward of the training loss into these parameters.
PASSES = ("weights", "alphas", "both")
DEFAULTS = {"rnn": dict(batch=16, bptt=35, ntoken=10_000, nhid=300, steps=8),
            "cnn": dict(batch=16, C=16, layers=8, steps=4)}


def search_options(args: argparse.Namespace, compiled: bool) -> dict[str, str]:
    """The search config's precision and, for a compiled step, compile mode, each named only when not the default
    (revisions before them knew no such keys)."""
    options = {} if args.precision == "fp32" else {"precision": args.precision}
    return {**options, "compile": args.compile} if compiled else options


# ---- one mode's step ---------------------------------------------------------------------------------------------
def rnn_step(args: argparse.Namespace, mode: str, device: torch.device,
             options: dict[str, str]) -> tuple[Any, Step, Callable[[], LossFn]]:
    from rnn_darts.data import synthetic_corpus
    from rnn_darts.search import RNNSearchTask, SearchConfig
    from rnn_darts.supernet import SupernetConfig

    corpus = synthetic_corpus(args.ntoken, tokens=4 * args.batch * (args.bptt + 1), seed=0)
    model = SupernetConfig(ntoken=args.ntoken, ninp=args.nhid, nhid=args.nhid, steps=args.steps)
    config = SearchConfig(order=mode, batch_size=args.batch, eval_batch_size=args.batch,  # no evaluation is timed
                          **options)
    task = RNNSearchTask(corpus, model, config, device, seed=0)
    task.model.train()
    x, y, xa, ya = (torch.randint(args.ntoken, (args.bptt, args.batch), device=device) for _ in range(4))
    state = {"hidden": task.model.init_hidden(args.batch), "arch_hidden": task.model.init_hidden(args.batch)}

    def step() -> None:
        state["hidden"], state["arch_hidden"], _ = task.train_step(x, y, state["hidden"], xa, ya,
                                                                   state["arch_hidden"])

    return task, step, lambda: task.loss(x, y, state["hidden"], True)


def cnn_step(args: argparse.Namespace, mode: str, device: torch.device,
             options: dict[str, str]) -> tuple[Any, Step, Callable[[], LossFn]]:
    from cnn_darts.data import synthetic_images
    from cnn_darts.search import CNNSearchTask, SearchConfig
    from cnn_darts.supernet import SupernetConfig

    data = synthetic_images(train=4 * args.batch, test=args.batch, seed=0)
    model = SupernetConfig(C=args.C, layers=args.layers, steps=args.steps, multiplier=args.steps)
    config = SearchConfig(order=mode, batch_size=args.batch, **options)
    task = CNNSearchTask(data, model, config, device, seed=0)
    task.model.train()
    generator = torch.Generator().manual_seed(0)
    x, xa = (torch.randn(args.batch, 3, 32, 32, generator=generator).to(device) for _ in range(2))
    y, ya = (torch.randint(10, (args.batch,), generator=generator).to(device) for _ in range(2))
    return task, lambda: task.train_step(x, y, xa, ya), lambda: task.loss(x, y)


def gradient_pass(task: Any, loss: Callable[[], LossFn], into: str) -> Step:
    """One forward and backward of the training loss into the weights, the alphas or both (`PASSES`), run as the
    engine runs its passes: the units its modes are made of, timed alone for each mode's floor."""
    engine = task.engine
    weights, alphas = into in ("weights", "both"), into in ("alphas", "both")

    def run() -> None:
        w = {n: p if weights else p.detach() for n, p in engine.weights}
        a = {n: p if alphas else p.detach() for n, p in engine.alphas}
        inputs = [p for p in w.values() if p.requires_grad] + [p for p in a.values() if p.requires_grad]
        torch.autograd.grad(loss()(engine.forward_with(w, a)), inputs, allow_unused=True)

    return run


def hessian_cost(args: argparse.Namespace) -> dict[str, Any] | None:
    """Seconds of one eigenvalue measurement at the default cost cap (tolerance 0: every product is spent), after
    one untimed measurement; the median of `--hessian-repeats` (None when 0)."""
    if not args.hessian_repeats:
        return None
    from shared.collapse import CollapseConfig

    device = resolve_threads(args)
    torch.manual_seed(0)
    task, _, loss = (rnn_step if args.task == "rnn" else cnn_step)(args, "plain", device, search_options(args, False))
    iterations = CollapseConfig().hessian_iterations
    times = []
    for _ in range(args.hessian_repeats + 1):
        started = time.perf_counter()
        eigen = task.engine.alpha_hessian_eigen(loss(), iterations, tol=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times[1:]), "products": eigen.iterations, "times_s": times[1:]}


def resolve_threads(args: argparse.Namespace) -> torch.device:
    from shared.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device


def build_step(args: argparse.Namespace, name: str) -> tuple[Step, torch.device, Any]:
    """The step of mode `name`, of `compiled:MODE` (the supernet's cells compiled: `--compile`) or for `pass:INTO`
    one gradient pass of a plain task (see `gradient_pass`); the device and the task it steps."""
    device = resolve_threads(args)
    torch.manual_seed(0)
    kind, _, what = name.rpartition(":")
    task, step, loss = (rnn_step if args.task == "rnn" else cnn_step)(args, "plain" if kind == "pass" else what,
                                                                      device, search_options(args, kind == "compiled"))
    return own_stream(gradient_pass(task, loss, what) if kind == "pass" else step), device, task


def own_stream(step: Step) -> Step:
    """`step` on a random stream of its own (restored before each call, kept after it): the modes built in one
    process draw the same numbers (dropout masks) whichever modes run between their steps."""
    from shared.checkpoint import rng_state, set_rng_state

    state = rng_state()

    def run() -> None:
        set_rng_state(state)
        step()
        state.update(rng_state())

    return run


def peak_memory(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """This process's peak memory over warm-up and two steps of `mode` (run in a child: the peak is its own), and
    the part of it the steps added."""
    step, device, _ = build_step(args, mode)

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    before = peak()
    for _ in range(args.warmup + 2):
        step()
    return {"peak_memory_mb": peak(), "working_memory_mb": peak() - before}


def warm_steps(args: argparse.Namespace, names: list[str]
               ) -> tuple[dict[str, Step], Callable[[Step], float], dict[str, Any], dict[str, float]]:
    """The steps of `names` (see `build_step`), each run `args.warmup` times, the timer of one step (which waits
    for a GPU to finish before and after), the tasks they step and the seconds of each one's first step (a compiled
    step compiles in it)."""
    steps = {name: build_step(args, name) for name in names}
    device = next(iter(steps.values()))[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(step: Step) -> float:
        sync()
        started = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - started

    first = {name: seconds(step) for name, (step, _, _) in steps.items() if args.warmup}
    for step, _, _ in steps.values():
        for _ in range(args.warmup - 1):
            step()
    tasks = {name: built[2] for name, built in steps.items()}
    return {name: built[0] for name, built in steps.items()}, seconds, tasks, first


def interleaved_times(args: argparse.Namespace, modes: list[str]) -> dict[str, dict[str, Any]]:
    """Seconds per step of every mode, timed round-robin (each round in a rotated order) so that a machine whose
    speed drifts slows every mode alike; `x_plain_paired` is the median over rounds of the ratio to that round's
    plain step. Then the operators one more step of each mode dispatches (`benchmarks.op_count`), but a compiled
    one's: under the counting mode its cells run eager, so the count would be the eager step's."""
    steps, seconds, _, first = warm_steps(args, modes)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(args.steps_timed):
        for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
            times[mode].append(seconds(steps[mode]))
    result = {mode: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "steps": len(t),
                     "times_s": t, "first_step_s": first.get(mode),
                     **({} if mode.startswith("compiled:") else count_ops(steps[mode]))}
              for mode, t in times.items()}
    if "plain" in times:
        for mode, t in times.items():
            result[mode]["x_plain_paired"] = statistics.median(a / b for a, b in zip(t, times["plain"]))
    return result


# ---- the parent: every mode, the table, the JSON -----------------------------------------------------------------
def child_memory(argv: list[str], mode: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_time", *argv, "--child", mode],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step_time: mode {mode} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def on_cpu(args: argparse.Namespace) -> bool:
    from shared.device import resolve_device

    return resolve_device(args.device).type == "cpu"


def is_default_config(args: argparse.Namespace) -> bool:
    """The sizes, device and precision the baselines (the original's seconds, 4c2d015's launches) were taken at."""
    return (on_cpu(args) and args.precision == "fp32"
            and all(getattr(args, k) == v for k, v in DEFAULTS[args.task].items()))


def device_name(device: str) -> str:
    from shared.device import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(resolved)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def write_json(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("rnn", "cnn"), required=True)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="the search's precision")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--bptt", type=int, help="rnn: window length (default 35)")
    parser.add_argument("--ntoken", type=int, help="rnn: vocabulary (default 10000)")
    parser.add_argument("--nhid", type=int, help="rnn: embedding = cell size (default 300)")
    parser.add_argument("--C", type=int, help="cnn: initial channels (default 16)")
    parser.add_argument("--layers", type=int, help="cnn: cells (default 8)")
    parser.add_argument("--steps", type=int, help="intermediate nodes per cell (rnn 8, cnn 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps-timed", type=int, default=10, dest="steps_timed")
    parser.add_argument("--compile", metavar="MODE", help="also time each mode but exact with the search's "
                        "compile=MODE (a torch.compile mode; reduce-overhead: CUDA graphs)")
    parser.add_argument("--epochs", type=int, default=50, help="the search length the projection assumes")
    parser.add_argument("--hessian-repeats", type=int, default=2, dest="hessian_repeats",
                        help="timed collapse measurements after an untimed one (0: none)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--compare", metavar="REV", help="time this tree and git revision REV in the same rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        parser.error(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    if (args.batch < 2 or args.threads < 1 or args.steps_timed < 1 or args.warmup < 0 or args.epochs < 1
            or args.hessian_repeats < 0):
        parser.error("--batch must be >= 2, --threads, --steps-timed and --epochs >= 1, --warmup and "
                     "--hessian-repeats >= 0")
    if args.compile:  # imported here: a --compare side may run a revision that predates it
        from shared.compiled import COMPILE_MODES

        if args.compile not in COMPILE_MODES[1:] or args.compare or not args.warmup:
            parser.error(f"--compile takes one of {', '.join(COMPILE_MODES[1:])}, needs --warmup >= 1 (the first "
                         "step compiles) and does not combine with --compare")
    from shared.device import resolve_device
    from shared.errors import UserFacingError

    try:
        resolve_device(args.device)
    except UserFacingError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(peak_memory(args, args.child)))
        return None
    names = args.modes.split(",")
    if args.serve or args.compare:
        from benchmarks.compare import compare_sides

        return compare_sides(args, names)
    compiled = [f"compiled:{mode}" for mode in names if mode != "exact"] if args.compile else []
    # Before the timing; on the CPU the children may overlap (each measures its own peak), not on one GPU.
    with ThreadPoolExecutor(max_workers=len(names) if on_cpu(args) else 1) as pool:
        memory = dict(zip(names + compiled, pool.map(lambda name: child_memory(argv, name), names + compiled)))
    # The floors' passes run in fp32: a bf16 search mixes precisions across them (shared.bilevel.BilevelConfig)
    floors = "plain" in names and set(names) & set(FLOORS) and args.precision == "fp32"
    passes = [f"pass:{into}" for into in PASSES] if floors else []
    timed = interleaved_times(args, names + compiled + passes)
    modes = {mode: {**timed[mode], **memory[mode]} for mode in names}
    config = {k: getattr(args, k) for k in DEFAULTS[args.task]}
    config.update(threads=args.threads, precision=args.precision, warmup=args.warmup, steps_timed=args.steps_timed,
                  compile=args.compile)
    result = {"task": args.task, "modes": modes, "device": device_name(args.device), "torch": torch.__version__,
              "config": config, "date": datetime.date.today().isoformat(),
              "compiled": {name.partition(":")[2]: {**timed[name], **memory[name]} for name in compiled},
              "passes": {name.partition(":")[2]: timed[name] for name in passes}, "hessian": hessian_cost(args)}
    add_ratios(args.task, modes, is_default_config(args) and args.threads == 2)
    add_floors(modes, result["passes"])
    add_compiled_ratios(modes, result["compiled"])
    add_projection([*modes.values(), *result["compiled"].values()],
                   steps_per_epoch(args.task, args.batch, args.bptt), args.epochs)
    result["checks"] = targets(args.task, modes, is_default_config(args))
    print_table(result)
    write_json(args, result)
    return result


if __name__ == "__main__":
    main()
