"""Runs kept in a database, read back as run folders: `experiments.report` and `experiments.reproduce` take a
database URL wherever they take a run folder, and read what it holds through the same folder reader.

A URL names a MongoDB (mongodb://...) or SQL (postgresql://..., sqlite:///...) database; `URL#3,7` names its runs 3
and 7, the URL alone every run in it. `export_runs` writes each run as Sacred's FileStorageObserver lays out a
folder (run.json, config.json, info.json, metrics.json, cout.txt, the artifacts, and the sources under _sources/),
so a run read from a database and the same run's folder give the same report.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

SOURCES = "_sources"


@dataclass
class StoredRun:
    """One run as a database holds it, in the shapes of the files of a run folder."""

    run_id: str
    run: dict[str, Any]  # run.json: experiment (sources as [name, content]), host, times, status, result, meta
    config: dict[str, Any]
    info: dict[str, Any]
    metrics: dict[str, dict[str, list[Any]]]  # name -> {steps, values, timestamps}
    artifacts: dict[str, bytes]
    sources: dict[str, bytes]  # recorded name (relative to the repository root) -> content
    captured_out: str


def iso(value: Any) -> Any:
    """A datetime as the ISO text a run folder holds; anything else unchanged."""
    return value.isoformat() if isinstance(value, datetime) else value


def is_database_url(text: str) -> bool:
    return "://" in text


def shown_url(text: str) -> str:
    """A path or URL as messages and records show it: without its user and password."""
    return re.sub(r"://[^/@]*@", "://", text) if is_database_url(text) else text


def split_url(text: str) -> tuple[str, list[str] | None]:
    """(URL, the run ids after '#', or None for every run)."""
    url, hash_mark, selection = text.partition("#")
    ids = [part.strip() for part in selection.split(",") if part.strip()] if hash_mark else None
    return url, ids


def read_database(text: str) -> list[StoredRun]:
    """The runs a URL (and its '#ids') names; ConfigError (one line) for a missing driver, an unreachable server
    or an id the database does not hold."""
    url, ids = split_url(text)
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("mongodb"):
        from experiments.tracking.mongo import connect, read_runs

        client, database, _ = connect(url, shown_url(url))
        stored = read_runs(client, database, ids)
    else:
        from experiments.tracking.observers import sql_module

        stored = sql_module(shown_url(url)).read_runs(url, ids)
    missing = [i for i in ids or [] if i not in {s.run_id for s in stored}]
    if missing:
        raise ConfigError(f"{shown_url(url)}: holds no run {', '.join(missing)}: name runs it holds after '#', or "
                          f"none for all")
    return stored


def write_folder(stored: StoredRun, root: Path) -> Path:
    """Write one stored run as `root/<id>/` with its sources under `root/_sources/`; returns the run folder."""
    folder = root / stored.run_id
    folder.mkdir(parents=True)
    (root / SOURCES).mkdir(exist_ok=True)
    recorded = []
    for name, content in stored.sources.items():
        path = Path(name)
        kept = root / SOURCES / f"{path.stem}_{hashlib.md5(content).hexdigest()}{path.suffix}"
        kept.write_bytes(content)
        recorded.append([name, str(kept.relative_to(root))])
    run = {**stored.run, "experiment": {**stored.run.get("experiment", {}), "sources": recorded},
           "artifacts": sorted(stored.artifacts)}
    for name, data in (("run.json", run), ("config.json", stored.config), ("info.json", stored.info),
                       ("metrics.json", stored.metrics)):
        (folder / name).write_text(json.dumps(data, sort_keys=True, indent=2))
    (folder / "cout.txt").write_text(stored.captured_out)
    for name, content in stored.artifacts.items():
        (folder / Path(name).name).write_bytes(content)
    return folder


def export_runs(text: str, root: Path) -> list[Path]:
    """Write the runs a database URL names as run folders under `root` (an empty or new folder)."""
    return [write_folder(stored, root) for stored in read_database(text)]
