"""The step-time benchmark's figures: ratios to plain and to the original, the floors, issue 19's targets and the
table (see `benchmarks.step_time`)."""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

# What each mode runs besides the real weight step (= plain): the passes of its algorithm, nothing else. Their
# timed sum is the mode's floor; the rest of a mode's time is the engine's own work (virtual step, norms, copies).
FLOORS = {"first": {"alphas": 1},  # grad_alpha L_val(w)
          "second": {"weights": 1, "both": 1, "alphas": 2}}  # grad_w L_train(w); L_val(w') both; the +-eps passes
# The original code, minimally ported to torch 2.13, CPU, 2 threads, batch 16: (low, high) seconds per step.
ORIGINAL_CPU = {
    "rnn": {"plain": (0.81, 0.81), "first": (1.50, 1.66), "second": (3.58, 3.79)},
    "cnn": {"plain": (3.52, 3.60), "first": (6.86, 7.11), "second": (16.3, 17.1)},
}
# Issue 19, each a ratio inside one run: every mode within 1.05 x its floor; the plain step against the original's
# CPU seconds (default config); the plain step's launches against the count at 4c2d015 (CPU, default config:
# `BASELINE_LAUNCHES`); the CNN exact step's time and peak memory over plain's.
TARGET_X_FLOOR = 1.05
TARGET_VS_ORIGINAL = {"rnn": 0.5, "cnn": 0.35}
BASELINE_LAUNCHES = {"rnn": 11_093, "cnn": 14_512}
TARGET_LAUNCHES = {"rnn": 0.5, "cnn": 2 / 3}
TARGET_EXACT = {"cnn": {"x_plain": 5.0, "memory_x_plain": 2.0}}


# The paper's search data: PTB's training tokens (with <eos>); CIFAR-10's training images that train the weights
SEARCH_DATA = {"rnn": 929_589, "cnn": 25_000}


def steps_per_epoch(task: str, batch: int, bptt: int | None) -> int:
    """The search steps in one epoch of the paper's data at `batch`: windows of `bptt` tokens down each of `batch`
    token columns (PTB), or batches of images (CIFAR-10)."""
    if task == "rnn":
        return math.ceil((SEARCH_DATA["rnn"] // batch - 1) / bptt)
    return math.ceil(SEARCH_DATA["cnn"] / batch)


def add_projection(figures: list[dict[str, Any]], steps: int, epochs: int) -> None:
    """Hours of an `epochs`-epoch search of the paper's data at each mode's median step (`steps` an epoch); the
    evaluations and collapse measurements between epochs are not in it."""
    for f in figures:
        f["projected_search_h"] = epochs * steps * f["median_s"] / 3600
        f["projection"] = {"epochs": epochs, "steps_per_epoch": steps}


def add_compiled_ratios(modes: dict[str, dict[str, Any]], compiled: dict[str, dict[str, Any]]) -> None:
    """Each compiled mode's time over the same mode's eager step: the median of the rounds' ratios."""
    for mode, f in compiled.items():
        f["x_eager_paired"] = statistics.median(c / e for c, e in zip(f["times_s"], modes[mode]["times_s"]))


def add_ratios(task: str, modes: dict[str, dict[str, Any]], original_config: bool) -> None:
    """Each mode's time, memory and launches over plain's and, at the original's config (`original_config`: the
    default sizes on the CPU with 2 threads), its time over the original's."""
    plain = modes.get("plain")
    original = ORIGINAL_CPU[task] if original_config else {}
    for mode, figures in modes.items():
        if plain is not None:
            figures["x_plain"] = figures["median_s"] / plain["median_s"]
            figures["memory_x_plain"] = figures["peak_memory_mb"] / plain["peak_memory_mb"]
            figures["working_memory_x_plain"] = figures["working_memory_mb"] / max(plain["working_memory_mb"], 1.0)
            figures["launches_x_plain"] = figures["launches"] / plain["launches"]
        if mode in original:
            figures["x_original"] = figures["median_s"] / original[mode][0]  # against the original's fastest


def targets(task: str, modes: dict[str, dict[str, Any]], default_config: bool) -> dict[str, dict[str, Any]]:
    """Issue 19's targets that this run's modes and config can speak to: {name: {value, limit, ok}}."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float, limit: float) -> None:
        checks[name] = {"value": value, "limit": limit, "ok": value <= limit}

    for mode, figures in modes.items():
        if "floor_x_plain_paired" in figures:
            over_floor = figures["x_plain_paired"] / figures["floor_x_plain_paired"]
            check(f"{mode} <= {TARGET_X_FLOOR} x its floor", over_floor, TARGET_X_FLOOR)
    plain = modes.get("plain")
    if plain is not None and "x_original" in plain:
        check(f"plain <= {TARGET_VS_ORIGINAL[task]} x original", plain["x_original"], TARGET_VS_ORIGINAL[task])
    if plain is not None and default_config:
        check(f"plain launches <= {TARGET_LAUNCHES[task]:.2f} x {BASELINE_LAUNCHES[task]} (at 4c2d015)",
              plain["launches"] / BASELINE_LAUNCHES[task], TARGET_LAUNCHES[task])
    if plain is not None and "exact" in modes and task in TARGET_EXACT:
        for key, limit in TARGET_EXACT[task].items():
            what = "time" if key == "x_plain" else "peak memory"
            check(f"exact {what} <= {limit} x plain", modes["exact"][key], limit)
    return checks


def add_floors(modes: dict[str, dict[str, Any]], passes: dict[str, dict[str, Any]]) -> None:
    """Each mode's floor: plain plus the gradient passes its algorithm runs (`FLOORS`), over plain, of the medians
    and per round (as x_plain_paired); what a mode takes above it is the engine's own work."""
    if not passes:
        return
    plain = modes["plain"]

    def floor(runs: dict[str, int], pick: Callable[[dict[str, Any]], float]) -> float:
        return (pick(plain) + sum(n * pick(passes[into]) for into, n in runs.items())) / pick(plain)

    for mode, runs in FLOORS.items():
        if mode in modes:
            modes[mode]["floor_x_plain"] = floor(runs, lambda f: f["median_s"])
            modes[mode]["floor_x_plain_paired"] = statistics.median(
                floor(runs, lambda f: f["times_s"][r]) for r in range(len(plain["times_s"])))


def print_table(result: dict[str, Any]) -> None:
    unit = "GPU MiB (peak allocated)" if result["device"].startswith("cuda") else "MiB (peak RSS)"
    print(f"{result['task']} step time, {result['device']}, torch {result['torch']}, "
          f"{', '.join(f'{k} {v}' for k, v in result['config'].items())}")
    print(f"{'mode':<8}{'median s':>10}{'min-max s':>16}{'x plain':>9}{'paired':>8}{'floor':>7}{'x original':>12}"
          f"{unit:>26}{'working':>9}{'launches':>10}{'ops':>8}")
    for mode, f in result["modes"].items():
        spread = f"{f['min_s']:.3f}-{f['max_s']:.3f}"
        ratio, paired, floor, orig = (f"{f[key]:.2f}" if key in f else "-"
                                      for key in ("x_plain", "x_plain_paired", "floor_x_plain_paired", "x_original"))
        print(f"{mode:<8}{f['median_s']:>10.3f}{spread:>16}{ratio:>9}{paired:>8}{floor:>7}{orig:>12}"
              f"{f['peak_memory_mb']:>26.0f}{f['working_memory_mb']:>9.0f}{f['launches']:>10}{f['ops']:>8}")
    if result["passes"]:
        print("gradient passes (forward + backward into): " + ", ".join(
            f"{into} {f['median_s']:.3f} s ({f['launches']} launches)" for into, f in result["passes"].items())
            + "; floor = plain + the passes of the mode's algorithm, over plain (per round)")
    hessian = result["hessian"]
    if hessian is not None:
        in_plain = (f" = {hessian['median_s'] / result['modes']['plain']['median_s']:.1f} plain steps"
                    if "plain" in result["modes"] else "")
        print(f"one collapse measurement (alpha Hessian eigenvalue, {hessian['products']} Hessian-vector products): "
              f"{hessian['median_s']:.3f} s{in_plain}")
    for mode, f in result["compiled"].items():
        print(f"compiled {mode}: {f['median_s']:.3f} s ({f['x_eager_paired']:.2f} x eager, paired), first step "
              f"{f['first_step_s']:.1f} s (compiles), {f['peak_memory_mb']:.0f} MiB")
    projection = next(iter(result["modes"].values()))["projection"]
    print(f"projected {projection['epochs']}-epoch search ({projection['steps_per_epoch']} steps an epoch of the "
          "paper's data at this batch; no evaluation): " + ", ".join(
              f"{mode} {f['projected_search_h']:.1f} h" for mode, f in result["modes"].items())
          + "".join(f", {mode} compiled {f['projected_search_h']:.1f} h" for mode, f in result["compiled"].items()))
    for name, check in result["checks"].items():
        print(f"  {'ok  ' if check['ok'] else 'MISS'} {name}: {check['value']:.2f}")
    print("launches: aten operators a step dispatches that are not views (a GPU's kernel launches); ops: all of them")
