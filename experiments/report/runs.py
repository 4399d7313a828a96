"""Reading Sacred FileStorageObserver run folders for `experiments.report`.

`discover` turns the command line's paths into run folders; `load_run` reads one folder into a `Run`. Nothing here
writes, and nothing raises on a broken run: a missing or unparsable file becomes a one-line note on the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.tracking.folders import read_json
from shared.genotypes import Genotype, GenotypeError, from_dict

# A metric's kind is read from its name, so new metrics need no code: `*_ppl` is a perplexity (lower is better),
# `*_acc` an accuracy (higher is better).
KINDS: dict[str, str] = {"_ppl": "ppl", "_acc": "acc"}
SOURCES = "_sources"  # Sacred's source store beside the numbered run folders


def metric_kind(name: str) -> str | None:
    """'ppl' | 'acc' for a metric name ending in a known suffix, else None."""
    return next((kind for suffix, kind in KINDS.items() if name.endswith(suffix)), None)


@dataclass(frozen=True)
class Series:
    """One Sacred metric: values by step (the epoch, 1-based), sorted by step."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def best(self, kind: str) -> float:
        finite = [v for v in self.values if math.isfinite(v)] or list(self.values)
        return min(finite) if kind == "ppl" else max(finite)


@dataclass
class Run:
    """One run folder as read from disk; `notes` says what was missing or broken."""

    path: Path
    label: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)
    genotype: Genotype | None = None
    history: list[tuple[int, Genotype]] = field(default_factory=list)
    alphas: tuple[int | None, dict[str, list[list[float]]]] | None = None  # (epoch, name -> softmax matrix)
    notes: list[str] = field(default_factory=list)

    @property
    def experiment(self) -> str:
        experiment = self.run.get("experiment")
        return str(experiment.get("name", "?")) if isinstance(experiment, dict) else "?"

    @property
    def is_search(self) -> bool:
        return self.experiment.endswith("_search") or self.alphas is not None

    @property
    def result(self) -> dict[str, Any]:
        """The experiment's result: run info `result` (run.json holds only its headline number), else run.json's
        `result` as runs before that recorded it."""
        for result in (self.info.get("result"), self.run.get("result")):
            if isinstance(result, dict):
                return result
        return {}


def _read(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, a note naming the file and its problem)."""
    data, problem = read_json(path)
    return data, None if problem is None else f"{path.name} {problem}"


def discover(paths: list[Path], skip: Path | None = None) -> tuple[list[Path], list[str]]:
    """The run folders that `paths` name (a run folder, or a folder of run folders), and one note per folder or file
    that is not a run. `skip` (the report's own folder) is never taken for a run. Paths must exist."""
    found: list[Path] = []
    notes: list[str] = []
    for path in paths:
        if path.is_file() and path.name == "run.json":
            path = path.parent
        if (path / "run.json").is_file():
            found.append(path)
            continue
        children = [c for c in sorted(path.iterdir(), key=_folder_order) if c.is_dir()] if path.is_dir() else []
        children = [c for c in children if c.name != SOURCES and not c.name.startswith(".")
                    and (skip is None or c.resolve() != skip.resolve())]
        if not children:
            notes.append(f"{path}: not a run folder (no run.json) and holds no run folders")
        for child in children:
            if (child / "run.json").is_file():
                found.append(child)
            else:
                notes.append(f"{child}: not a run folder (no run.json), skipped")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, notes


def _folder_order(path: Path) -> tuple[int, int, str]:
    """Numbered run folders in numeric order (2 before 10), then the rest by name."""
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def assign_labels(runs: list[Run]) -> None:
    """Label each run by its folder name, or by as much of its path as tells it apart from the others."""
    for depth in range(1, 64):
        labels = ["/".join(run.path.parts[-depth:]) for run in runs]
        if len(set(labels)) == len(labels):
            break
    for run, label in zip(runs, labels):
        run.label = label


def load_run(path: Path) -> Run:
    """Read one run folder: run.json, config.json, metrics.json, info.json and the genotype/alphas artifacts."""
    run = Run(path=path)
    run.run = _object(path / "run.json", run.notes)
    run.config = _object(path / "config.json", run.notes)
    run.info = _object(path / "info.json", run.notes, missing_ok=True)
    run.metrics = _metrics(path / "metrics.json", run.notes)
    run.genotype = _genotype(run)
    run.history = _history(run)
    run.alphas = _alphas(run)
    return run


def _object(path: Path, notes: list[str], missing_ok: bool = False) -> dict[str, Any]:
    data, problem = _read(path)
    if problem and not (missing_ok and data is None and not path.exists()):
        notes.append(problem)
    if data is not None and not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object")
    return data if isinstance(data, dict) else {}


def _metrics(path: Path, notes: list[str]) -> dict[str, Series]:
    """Sacred's metrics.json ({name: {steps, values, timestamps}}) as Series; a malformed entry becomes a note."""
    data, problem = _read(path)
    if problem:
        notes.append(f"{problem}: no metrics")
        return {}
    if not isinstance(data, dict) or not data:
        notes.append("no metrics recorded")
        return {}
    metrics = {}
    for name, entry in sorted(data.items()):
        try:
            pairs = sorted((int(s), float(v)) for s, v in zip(entry["steps"], entry["values"]) if v is not None)
        except (KeyError, TypeError, ValueError):
            notes.append(f"metrics.json: metric {name!r} is not in Sacred's format, ignored")
            continue
        if pairs:
            steps, values = zip(*pairs)
            metrics[name] = Series(tuple(steps), tuple(values))
    return metrics


def _first_genotype(candidates: list[tuple[str, Any]], notes: list[str]) -> Genotype | None:
    for source, data in candidates:
        if data is None:
            continue
        try:
            return from_dict(data)
        except GenotypeError as error:
            notes.append(f"{source}: not a valid genotype ({error})")
    return None


def _genotype(run: Run) -> Genotype | None:
    """The run's genotype: run info `genotype`, else the artifact genotype.json, else the result's."""
    artifact, problem = _read(run.path / "genotype.json")
    if problem and artifact is None and (run.path / "genotype.json").exists():
        run.notes.append(problem)
    return _first_genotype([("info.genotype", run.info.get("genotype")), ("genotype.json", artifact),
                            ("result.genotype", run.result.get("genotype"))], run.notes)


def _artifact_or_info(run: Run, name: str) -> tuple[Any, str]:
    """Run info `name`, else the artifact `name`.json (noting a broken one), with where it came from."""
    if run.info.get(name) is not None:
        return run.info[name], f"info.{name}"
    data, problem = _read(run.path / f"{name}.json")
    if problem and (run.path / f"{name}.json").exists():
        run.notes.append(problem)
    return data, f"{name}.json"


def _history(run: Run) -> list[tuple[int, Genotype]]:
    """[(epoch, genotype)] from run info `genotype_history` or the artifact genotype_history.json."""
    data, source = _artifact_or_info(run, "genotype_history")
    if data is None:
        return []
    if not isinstance(data, list):
        run.notes.append(f"{source} is not a list, ignored")
        return []
    history = []
    for i, entry in enumerate(data):
        try:
            history.append((int(entry["epoch"]), from_dict(entry["genotype"])))
        except (KeyError, TypeError, ValueError) as error:  # GenotypeError is a ValueError
            run.notes.append(f"{source}[{i}] ignored ({error})")
    return sorted(history, key=lambda item: item[0])


def _alphas(run: Run) -> tuple[int | None, dict[str, list[list[float]]]] | None:
    """The last epoch's alpha softmax: artifact alphas.json ([{epoch, alphas}]), else run info `alphas`."""
    data, problem = _read(run.path / "alphas.json")
    if problem and (run.path / "alphas.json").exists():
        run.notes.append(problem)
    epoch, matrices = None, run.info.get("alphas")
    if isinstance(data, list) and data:
        try:
            last = max(data, key=lambda entry: int(entry["epoch"]))
            epoch, matrices = int(last["epoch"]), last["alphas"]
        except (KeyError, TypeError, ValueError):
            run.notes.append("alphas.json is not a list of {epoch, alphas}, ignored")
    elif isinstance(run.info.get("epochs_done"), int):
        epoch = run.info["epochs_done"]
    if matrices is None:
        return None
    checked = {name: m for name, m in matrices.items() if _is_matrix(m)} if isinstance(matrices, dict) else {}
    if not checked:
        run.notes.append("alphas are not {name: matrix}, no heatmap")
        return None
    return epoch, checked


def _is_matrix(value: Any) -> bool:
    """A non-empty rectangular list of lists of numbers."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) and row for row in value):
        return False
    return len({len(row) for row in value}) == 1 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for row in value for x in row)
