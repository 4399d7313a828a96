"""Re-run a logged Sacred run from its record and compare the two, step by step.

    python -m experiments.reproduce runs/7                      # the new run goes to runs/ ($DARTS_RUNS_DIR)
    python -m experiments.reproduce runs/7 --runs-dir /tmp/rep  # ... or elsewhere
    python -m experiments.reproduce postgresql://host/darts#7   # run 7 of a team database (or mongodb://...)

The new run is the same experiment (run.json `experiment.name` -> `experiments.<name>.ex`), the same named configs
and the whole recorded config.json as config updates (so defaults changed since do not matter; the seed is the
same); a resumed run resumes from the same checkpoint. First a list of warnings names the source files whose md5
differs from the recorded one and the packages whose version differs. Afterwards every metric is compared at every
step (the epoch, for a search) but the wall-clock ones (`is_wall_clock`), and so is the final genotype (run info
`genotype`); the largest difference and a verdict are printed, and the new run keeps the comparison: info
`reproduces` (the old run), `reproduction.json` (every difference) and info `reproduction` (a summary).

Exit status: 0 identical, 1 differs (or the reproduction failed), 2 bad input (one line: the problem and the fix).
The old run (folder or database) is only read.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# experiments.tracking first: its package silences sacred 0.8.7's pkg_resources warning before sacred is imported.
from experiments.tracking.errors import OneLineParser, RunError
from experiments.tracking.database import export_runs, is_database_url, shown_url, split_url
from experiments.tracking.experiment import REPO_ROOT, SOURCE_PACKAGES, package_sources
from experiments.tracking.observers import RunFolderObserver, runs_dir
from experiments.tracking.folders import read_json
from sacred import Experiment
from sacred.dependencies import get_digest
from sacred.utils import SacredError

from shared.errors import ConfigError, UserFacingError

# Metrics that measure wall-clock time differ between any two runs, so they are not compared: these names, and any
# name ending in one of the suffixes (a future `step_time` or `samples_per_second` is excluded without a code change).
WALL_CLOCK_METRICS = frozenset({"epoch_time"})
WALL_CLOCK_SUFFIXES = ("_time", "_seconds", "_per_second")
COMPARISON_FILE = "reproduction.json"
_MD5 = re.compile(r"_([0-9a-f]{32})\.py$")


class RecordError(UserFacingError):
    """The run folder cannot be reproduced as it is: the message names the problem and the fix (exit status 2)."""


def is_wall_clock(metric: str) -> bool:
    return metric in WALL_CLOCK_METRICS or metric.endswith(WALL_CLOCK_SUFFIXES)


@dataclass(frozen=True)
class Record:
    """What a FileStorageObserver run folder says about its run."""

    folder: Path
    run: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    info: dict[str, Any]
    origin: str = ""  # where the run was read from: its folder, or DATABASE_URL#ID

    def __post_init__(self) -> None:
        if not self.origin:
            object.__setattr__(self, "origin", str(self.folder.resolve()))

    @property
    def experiment(self) -> dict[str, Any]:
        return self.run["experiment"]

    @property
    def named_configs(self) -> list[str]:
        return list(self.run.get("meta", {}).get("named_configs", []))


def read_object(path: Path, required: bool = True) -> dict[str, Any]:
    """The JSON object in `path` (read by the report's loader too); {} for a missing optional file; RecordError
    for anything else."""
    data, problem = read_json(path)
    if problem == "missing":
        if required:
            raise RecordError(f"{path} is missing: a run folder holds run.json and config.json; pass a complete one")
        return {}
    if problem is not None:
        reason = problem.removeprefix("unparsable ")
        raise RecordError(f"{path} is not valid JSON {reason}: restore the file, or reproduce another run")
    if not isinstance(data, dict):
        raise RecordError(f"{path} holds a JSON {type(data).__name__}, not an object: restore the file")
    return data


def load_record(folder: Path) -> Record:
    """Read a completed run's record, or raise RecordError naming what is wrong."""
    if not (folder / "run.json").is_file():
        raise RecordError(f"{folder} is not a Sacred run folder (no run.json): pass a numbered run folder such as "
                          f"runs/7")
    run = read_object(folder / "run.json")
    if not isinstance(run.get("experiment"), dict) or not isinstance(run["experiment"].get("name"), str):
        raise RecordError(f"{folder / 'run.json'} names no experiment (experiment.name): restore the file")
    if run.get("status") != "COMPLETED":
        raise RecordError(f"{folder} did not complete (status {run.get('status')}): only a completed run can be "
                          f"compared; resume it or run it again")
    metrics = read_object(folder / "metrics.json", required=False)
    for name, series in metrics.items():
        if not (isinstance(series, dict) and isinstance(series.get("steps"), list)
                and isinstance(series.get("values"), list) and len(series["steps"]) == len(series["values"])):
            raise RecordError(f"{folder / 'metrics.json'}: metric {name!r} lacks equally long steps and values: "
                              f"restore the file")
    return Record(folder, run, read_object(folder / "config.json"), metrics,
                  read_object(folder / "info.json", required=False))


def find_experiment(name: str) -> Experiment:
    """`experiments.<name>.ex`, or RecordError naming the experiments there are."""
    known = sorted(p.stem for p in Path(__file__).parent.glob("*.py")  # every module beside this one is one
                   if p.stem not in ("__init__", Path(__file__).stem))
    if name not in known:
        raise RecordError(f"run.json names the experiment {name!r}, which is not one of experiments/ "
                          f"({', '.join(known)}): reproduce it with the code that has it")
    ex = getattr(importlib.import_module(f"experiments.{name}"), "ex", None)
    if not isinstance(ex, Experiment):
        raise RecordError(f"experiments.{name} has no Sacred experiment `ex`: it cannot be reproduced")
    return ex


def source_changes(record: Record, root: Path = REPO_ROOT) -> list[str]:
    """One line per recorded source file that changed (its md5 is in its stored name, `_sources/<stem>_<md5>.py`)
    or is gone since the run, and one naming the current source files the run did not record."""
    base = Path(str(record.experiment.get("base_dir", "")))
    sources = record.experiment.get("sources", [])
    # Older runs recorded experiments/ files only, relative to base_dir experiments/; newer ones every package file,
    # relative to the repository root, whatever the checkout folder is called (it may be named like a package).
    flat = all("/" not in str(name) for name, _ in sources)
    prefix = f"{base.name}/" if flat and base.name in SOURCE_PACKAGES else ""
    recorded = {prefix + str(name): _MD5.search(str(stored)) for name, stored in sources}
    lines = []
    for name, md5 in sorted(recorded.items()):
        if not (root / name).is_file():
            lines.append(f"{name}: gone since the run")
        elif md5 is None or get_digest(str(root / name)) != md5.group(1):
            lines.append(f"{name}: changed since the run")
    new = [str(p.relative_to(root)) for p in package_sources(root) if str(p.relative_to(root)) not in recorded]
    if new:
        lines.append(f"not recorded by the run (new since, or the run predates full source records): {', '.join(new)}")
    return lines


def dependency_changes(record: Record) -> list[str]:
    """One line per recorded package (run.json experiment.dependencies, 'name==version') whose version differs now."""
    lines = []
    for entry in record.experiment.get("dependencies", []):
        name, _, version = str(entry).partition("==")
        if not version or version == "<unknown>":
            continue
        try:
            now = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            now = "not installed"
        if now != version:
            lines.append(f"{name}: {version} in the run, {now} now")
    return lines


@dataclass(frozen=True)
class Difference:
    metric: str
    step: int
    old: Any
    new: Any

    @property
    def relative(self) -> float:
        """|new - old| / max(|old|, |new|); inf when either is not a finite number."""
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in (self.old, self.new))
        return abs(self.new - self.old) / max(abs(self.old), abs(self.new)) if numbers else math.inf


def _same(old: Any, new: Any) -> bool:
    """Equal, or both NaN (bit-identical runs log the same NaN)."""
    return old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))


@dataclass
class Comparison:
    """Every difference between two runs' metrics and final genotypes."""

    compared: dict[str, int] = field(default_factory=dict)  # metric -> steps compared; the genotype counts 1
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # 'name: ...' for metrics or steps only one run has, the genotype

    @property
    def identical(self) -> bool:
        return not self.differences and not self.notes

    @property
    def largest(self) -> Difference | None:
        return max(self.differences, key=lambda d: d.relative, default=None)

    def differing(self) -> list[str]:
        return sorted({d.metric for d in self.differences} | {n.split(":")[0] for n in self.notes})


def compare(old: Record, new: Record) -> Comparison:
    """Compare every metric but the wall-clock ones step by step, and the final genotypes."""
    comparison = Comparison()
    for name in sorted(set(old.metrics) | set(new.metrics)):
        if is_wall_clock(name):
            continue
        if name not in old.metrics or name not in new.metrics:
            comparison.notes.append(f"{name}: logged by the {'new' if name in new.metrics else 'old'} run only")
            continue
        before, after = (dict(zip(r.metrics[name]["steps"], r.metrics[name]["values"])) for r in (old, new))
        for label, only in (("old", set(before) - set(after)), ("new", set(after) - set(before))):
            if only:
                comparison.notes.append(f"{name}: steps {sorted(only)} in the {label} run only")
        common = sorted(set(before) & set(after))
        comparison.compared[name] = len(common)
        comparison.differences += [Difference(name, step, before[step], after[step]) for step in common
                                   if not _same(before[step], after[step])]
    genotypes = old.info.get("genotype"), new.info.get("genotype")
    if genotypes != (None, None):
        comparison.compared["genotype"] = 1
        if genotypes[0] != genotypes[1]:
            comparison.notes.append(f"genotype: old {_compact(genotypes[0])}, new {_compact(genotypes[1])}")
    return comparison


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def report(comparison: Comparison, unit: str) -> list[str]:
    """The printed comparison: one line per differing metric and note, the largest difference, the verdict."""
    lines = []
    for metric in sorted({d.metric for d in comparison.differences}):
        steps = [d for d in comparison.differences if d.metric == metric]
        worst = max(steps, key=lambda d: d.relative)
        lines.append(f"{metric}: {len(steps)} of {comparison.compared[metric]} {unit}s differ, first at {unit} "
                     f"{steps[0].step}; largest at {unit} {worst.step}: old {worst.old!r}, new {worst.new!r}")
    lines += comparison.notes
    largest = comparison.largest
    lines.append("largest difference: " + ("none" if largest is None else
                 f"{largest.metric} at {unit} {largest.step}: old {largest.old!r}, new {largest.new!r} "
                 f"(relative {largest.relative:.3g})"))
    lines.append(f"verdict: IDENTICAL: {', '.join(comparison.compared) or 'nothing was logged'}"
                 if comparison.identical else f"verdict: DIFFERS in {', '.join(comparison.differing())}")
    return lines


def run_again(record: Record, ex: Experiment, runs: Path) -> Path:
    """Run the recorded experiment again under `runs` (and in the databases the environment names); returns the
    new run folder."""
    link = {"run": record.origin, "experiment": record.experiment["name"], "named_configs": record.named_configs}
    try:
        run = ex.run(named_configs=record.named_configs, config_updates=record.config, info={"reproduces": link},
                     options={"--file_storage": str(runs)})
    except RunError as error:  # the run's own one-line user error (its data is gone, ...)
        raise RecordError(f"the reproduction stopped: {error}") from None
    except SacredError as error:  # raised before the run starts: the current code does not take the old config
        raise RecordError(f"experiments.{record.experiment['name']} does not take the run's config now "
                          f"({' '.join(str(error).split())}): reproduce it with the code the run used") from None
    return next(Path(o.dir) for o in run.observers if isinstance(o, RunFolderObserver))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a temporary file beside `path`, then rename it over `path`: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record_comparison(old: Record, new: Record, comparison: Comparison, warnings: list[str]) -> None:
    """`reproduction.json` with every difference, and a summary in the new run's info.json (both atomic)."""
    largest = comparison.largest
    summary = {"identical": comparison.identical, "differs_in": comparison.differing(), "file": COMPARISON_FILE,
               "largest": None if largest is None else vars(largest)}
    write_json_atomic(new.folder / COMPARISON_FILE, {
        **summary, "reproduces": old.origin, "compared": comparison.compared,
        "excluded_wall_clock": sorted(m for m in {*old.metrics, *new.metrics} if is_wall_clock(m)),
        "differences": [vars(d) for d in comparison.differences], "notes": comparison.notes, "warnings": warnings})
    write_json_atomic(new.folder / "info.json", {**new.info, "reproduction": summary})


def check(old: Record, runs: Path) -> list[str]:
    """Raise RecordError when the run cannot be reproduced; else the warnings about what changed since."""
    if runs.resolve() == old.folder.resolve() or old.folder.resolve() in runs.resolve().parents:
        raise RecordError(f"--runs-dir {runs} is inside the run being reproduced, which must stay as it is: "
                          f"pass another folder")
    blocker = next((p for p in (runs, *runs.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RecordError(f"--runs-dir {runs} cannot be a folder: {blocker} is a file; pass a folder for the new run")
    resume = old.config.get("resume")  # a resumed run resumes from the same checkpoint again
    if resume and not Path(str(resume)).exists():
        raise RecordError(f"{old.folder} resumed from {resume}, which no longer exists (relative paths are taken "
                          f"from the current folder): restore that checkpoint to reproduce the run")
    warnings = [f"source {line}" for line in source_changes(old)] + [
        f"package {line}" for line in dependency_changes(old)]
    if old.config.get("time_limit"):
        warnings.append(f"the run had time_limit={old.config['time_limit']}: the reproduction may stop after "
                        f"another number of epochs")
    return warnings


def reproduce(target: str, runs: Path) -> int:
    """Run the run `target` names (a run folder, or DATABASE_URL#ID) again under `runs` and print the comparison;
    the exit status (0 identical, 1 differs)."""
    if not is_database_url(target):
        return reproduce_record(load_record(Path(target)), runs)
    _, ids = split_url(target)
    if ids is None or len(ids) != 1:
        raise RecordError(f"{target} names {'no' if not ids else 'several'} runs: name one, as DATABASE_URL#7")
    with tempfile.TemporaryDirectory(prefix="darts-reproduce-") as folder:
        try:
            exported = export_runs(target, Path(folder))[0]
        except ConfigError as error:
            raise RecordError(str(error)) from None
        return reproduce_record(replace(load_record(exported), origin=shown_url(target)), runs)


def reproduce_record(old: Record, runs: Path) -> int:
    ex = find_experiment(old.experiment["name"])
    warnings = check(old, runs)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    new = load_record(run_again(old, ex, runs))
    comparison = compare(old, new)
    record_comparison(old, new, comparison, warnings)
    named = f" with {' '.join(old.named_configs)}" if old.named_configs else ""
    print(f"reproduction of {old.origin} ({old.experiment['name']}{named}): new run {new.folder}")
    excluded = sorted(m for m in old.metrics if is_wall_clock(m))
    if excluded:
        print(f"not compared (wall-clock): {', '.join(excluded)}")
    print("\n".join(report(comparison, "epoch" if "epochs" in old.config else "step")))
    return 0 if comparison.identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run to reproduce (only read): its folder, e.g. runs/7, or "
                                        "DATABASE_URL#ID, e.g. postgresql://host/darts#7")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the new run goes (default: $DARTS_RUNS_DIR, else runs/)")
    args = parser.parse_args(argv)
    try:
        return reproduce(args.run_dir, args.runs_dir or runs_dir())
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:  # a crash of the new run (recorded as FAILED) or of the comparison: it does not reproduce
        traceback.print_exc()
        print("verdict: DIFFERS: the reproduction failed (traceback above)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
