"""The report's tables as plain rows of strings: the runs, the config keys that differ, the genotype's changes.

Sacred stamps start, stop and heartbeat times in UTC without a zone; `now` is a naive UTC datetime too.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from experiments.report.runs import Run, Series, metric_kind
from shared.genotypes import Genotype

NONE = "–"  # an empty cell
RUN_HEADER = ["id", "experiment", "status", "strategy", "order", "seed", "epochs", "best valid", "final valid", "test",
              "parameters", "wall time"]


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(value: Any) -> datetime | None:
    """A Sacred ISO timestamp as a naive UTC datetime, or None."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def duration(seconds: float, coarse: bool = False) -> str:
    """'38 s', '12 min 05 s', '3 h 02 min', '2 d 03 h'; `coarse` keeps the largest unit only ('3 h')."""
    seconds = max(0, int(round(seconds)))
    units = [("d", 86400), ("h", 3600), ("min", 60), ("s", 1)]
    for i, (name, size) in enumerate(units):
        if seconds >= size or name == "s":
            big, rest = divmod(seconds, size)
            if coarse or name == "s":
                return f"{big} {name}"
            small, small_size = units[i + 1]
            return f"{big} {name} {rest // small_size:02d} {small}"
    raise AssertionError("unreachable")


def status(run: Run, now: datetime, stale_after: float) -> str:
    """Sacred's status; a RUNNING run whose heartbeat is older than `stale_after` seconds may have been killed."""
    value = str(run.run.get("status") or "?")
    if value != "RUNNING":
        return value
    beat = parse_time(run.run.get("heartbeat"))
    if beat is None:
        return "RUNNING? no heartbeat"
    age = (now - beat).total_seconds()
    return f"RUNNING? last heartbeat {duration(age, coarse=True)} ago" if age > stale_after else "RUNNING"


def wall_time(run: Run) -> str:
    """stop_time - start_time, or up to the last heartbeat when the run has not stopped."""
    start = parse_time(run.run.get("start_time"))
    stop = parse_time(run.run.get("stop_time"))
    beat = parse_time(run.run.get("heartbeat"))
    if start is None or (stop or beat) is None:
        return NONE
    if stop is not None:
        return duration((stop - start).total_seconds())
    return f"{duration((beat - start).total_seconds())} (to last heartbeat)"


def epochs(run: Run) -> str:
    """'done / configured': run info epochs_done, else the last step of any metric."""
    done = run.info.get("epochs_done")
    if not isinstance(done, int):
        done = max((series.steps[-1] for series in run.metrics.values()), default=None)
    configured = run.config.get("epochs")
    return f"{NONE if done is None else done} / {NONE if configured is None else configured}"


def format_value(value: Any, kind: str) -> str:
    """'757.15 ppl', '10.55% acc' (an accuracy in [0, 1] as a percentage)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return NONE
    if kind == "acc" and 0 <= value <= 1:
        return f"{value:.2%} acc"
    return f"{value:.2f} {kind}"


def split_metrics(run: Run, split: str) -> list[tuple[str, str]]:
    """(name, kind) of the split's ppl/acc metrics ('valid_ppl', 'ppl'), from metrics.json or else the result."""
    names = set(run.metrics) | {k for k in run.result if not k.startswith("best_")}
    found = [(name, metric_kind(name)) for name in sorted(names) if name.startswith(f"{split}_")]
    return [(name, kind) for name, kind in found if kind]


def metric_cells(run: Run, split: str) -> tuple[str, str]:
    """(best, final) of the split's headline metrics, '; '-joined when a run has several."""
    best, final = [], []
    for name, kind in split_metrics(run, split):
        series: Series | None = run.metrics.get(name)
        best_value = series.best(kind) if series else run.result.get(f"best_{name}", run.result.get(name))
        final_value = series.values[-1] if series else run.result.get(name)
        best.append(format_value(best_value, kind))
        final.append(format_value(final_value, kind))
    return "; ".join(best) or NONE, "; ".join(final) or NONE


def run_row(run: Run, now: datetime, stale_after: float) -> list[str]:
    """One row of the runs table, in RUN_HEADER's order."""
    best, final = metric_cells(run, "valid")
    params = run.info.get("num_parameters", run.result.get("num_parameters"))
    return [run.label, run.experiment, status(run, now, stale_after),
            str(run.config.get("strategy", "darts")) if run.is_search else NONE,  # runs before random search: darts
            str(run.config.get("order", NONE)) if run.is_search else NONE,
            str(run.config.get("seed", NONE)), epochs(run), best, final, metric_cells(run, "test")[1],
            f"{params:,}" if isinstance(params, int) else NONE, wall_time(run)]


def failure(run: Run) -> str | None:
    """The one-line error of a FAILED run: the last non-empty line of its fail_trace."""
    if run.run.get("status") != "FAILED":
        return None
    trace = run.run.get("fail_trace")
    text = "".join(map(str, trace)) if isinstance(trace, list) else str(trace or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no fail_trace recorded"


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def config_differences(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(keys, one row per run): the config keys present in more than one run with different values there."""
    keys = sorted({key for run in runs for key in run.config if key != "__doc__"})  # Sacred's named config doc
    differing = []
    for key in keys:
        values = [_shown(run.config[key]) for run in runs if key in run.config]
        if len(values) > 1 and len(set(values)) > 1:
            differing.append(key)
    rows = [[run.label] + [_shown(run.config[key]) if key in run.config else NONE for key in differing]
            for run in runs]
    return differing, rows


def _edges(genotype: Genotype) -> dict[str, str]:
    """Position -> 'op(input)' for every edge, by the genotype's own field names ('recurrent[2]', 'normal[5]')."""
    fields = ("recurrent",) if genotype.space == "rnn" else ("normal", "reduce")
    return {f"{name}[{i}]": f"{op}({j})" for name in fields for i, (op, j) in enumerate(getattr(genotype, name))}


def _concats(genotype: Genotype) -> dict[str, str]:
    fields = ("concat",) if genotype.space == "rnn" else ("normal_concat", "reduce_concat")
    return {name: ",".join(map(str, getattr(genotype, name))) for name in fields}


def genotype_changes(history: list[tuple[int, Genotype]]) -> list[list[str]]:
    """Rows (epoch, edges changed, what changed): the first epoch, then each epoch whose genotype differs from the
    previous epoch's."""
    rows: list[list[str]] = []
    previous: Genotype | None = None
    for epoch, genotype in history:
        if previous is None:
            rows.append([str(epoch), NONE, "first genotype"])
        elif genotype != previous:
            old, new = _edges(previous), _edges(genotype)
            changed = [f"{pos}: {old.get(pos, NONE)} → {new.get(pos, NONE)}"
                       for pos in dict.fromkeys([*old, *new]) if old.get(pos) != new.get(pos)]
            concat = [f"{name}: {value} → {_concats(genotype).get(name, NONE)}"
                      for name, value in _concats(previous).items() if _concats(genotype).get(name) != value]
            rows.append([str(epoch), str(len(changed)), "; ".join(changed + concat)])
        previous = genotype
    return rows
