"""One report over Sacred run folders: a table of runs, learning curves, collapse diagnostics, cells, alphas and
genotype changes.

    python -m experiments.report runs --out reports/latest          # every numbered run folder under runs/
    python -m experiments.report runs/3 runs/7 old/runs --out /tmp/compare
    python -m experiments.report postgresql://host/darts runs --out /tmp/team  # a team database and a folder

RUNS are FileStorageObserver run folders, folders holding them (`_sources` is skipped), or database URLs
(mongodb://..., postgresql://..., sqlite:///...; `URL#3,7` for some of its runs, read as run folders). Writes
DIR/report.md and DIR/report.html with the PNG plots and SVG cells they show beside them; the runs are only read.
A missing or broken file in a run is stated in the report in one line; a RUNS path that does not exist, or a
database that cannot be read, exits 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from experiments.report.cells import cell_svg, genotype_cells
from experiments.report.doc import Block, Heading, Image, Items, Para, Table, to_html, to_markdown
from experiments.report.plots import Plot, alpha_heatmap, collapse_plot, curve_plots, early_stop
from experiments.report.runs import Run, assign_labels, discover, load_run
from experiments.tracking.database import export_runs, is_database_url, shown_url
from experiments.tracking.errors import OneLineParser
from experiments.report.tables import NONE, RUN_HEADER, config_differences, failure, genotype_changes, run_row, utc_now
from shared.errors import ConfigError
from shared.genotypes import to_dict

logger = logging.getLogger(__name__)
STALE_AFTER = 600.0  # seconds; Sacred beats every 10 s, so a RUNNING run silent for 10 minutes was likely killed


class ReportError(Exception):
    """A command-line mistake, reported in one line with exit code 2."""


@dataclass
class Report:
    """What `build_report` wrote: the two documents, the runs read, and every image with what it shows."""

    markdown: Path
    html: Path
    runs: list[Run]
    plots: list[Plot] = field(default_factory=list)
    svgs: list[Path] = field(default_factory=list)


def _file_stem(label: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a run label ('old/runs/3' -> 'old_runs_3')."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_.") or "run"
    unique, k = stem, 2
    while unique in taken:
        unique, k = f"{stem}_{k}", k + 1
    taken.add(unique)
    return unique


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _guarded(what: str, notes: list[str], draw: Callable[[], list[Block]]) -> list[Block]:
    """Run one drawing step; if a run's data breaks it, the report says so in one line instead of stopping."""
    try:
        return draw()
    except Exception as error:  # noqa: BLE001 - one odd run must not cost the report of the others
        logger.warning("%s failed: %s", what, error)
        notes.append(f"{what} failed ({type(error).__name__}: {error})")
        return []


def _runs_table(runs: list[Run], now: datetime, stale_after: float) -> list[Block]:
    if not runs:
        return [Heading(2, "Runs"), Para("No run folders found.")]
    return [Heading(2, "Runs"), Table(tuple(RUN_HEADER), tuple(tuple(run_row(r, now, stale_after)) for r in runs))]


def _config_differences(runs: list[Run]) -> list[Block]:
    """The config keys that differ between runs, with each run's values."""
    keys, rows = config_differences(runs)
    blocks: list[Block] = [Heading(2, "Config differences")]
    if keys:
        blocks += [Para(f"Config keys present in more than one run with different values: {', '.join(keys)}."),
                   Table(("id", *keys), tuple(tuple(row) for row in rows))]
    else:
        blocks.append(Para("No config key that two runs share differs between them."))
    return blocks


def _problems(runs: list[Run], skipped: list[str]) -> list[Block]:
    """Failed runs with their one-line error, then every missing or broken file and other run notes."""
    blocks: list[Block] = []
    failed = [(run, line) for run in runs if (line := failure(run))]
    if failed:
        blocks += [Heading(2, "Failed runs"),
                   Items(tuple((f"{run.label} ({run.experiment}): ", str(line)) for run, line in failed))]
    notes = [(note, "") for note in skipped]
    for run in runs:
        for key in ("stopped_early", "resumed_from", "genotype_source"):
            if run.info.get(key) is not None:
                notes.append((f"{run.label}: {key} ", json.dumps(run.info[key])))
        notes += [(f"{run.label}: {note}", "") for note in run.notes]
    if notes:
        blocks += [Heading(2, "Notes"), Items(tuple(notes))]
    return blocks


def _curves(runs: list[Run], out: Path, report: Report) -> list[Block]:
    """The learning-curve PNGs, each with the runs it plots."""
    plots = curve_plots(runs, out)
    report.plots += plots
    blocks: list[Block] = [Heading(2, "Learning curves")]
    if not plots:
        return blocks + [Para("No run has per-epoch perplexity (*_ppl) or accuracy (*_acc) metrics.")]
    for plot in plots:
        blocks.append(Image(plot.file, ", ".join(plot.panels)))
        blocks.append(Items(tuple((f"{name}: {_count(len(labels), 'run')}: ", ", ".join(labels))
                                  for name, labels in plot.panels.items())))
    without = [run.label for run in runs if not run.metrics]
    if without:
        blocks.append(Para(f"Without metrics (not plotted): {', '.join(without)}."))
    return blocks


def _collapse(runs: list[Run], out: Path, report: Report) -> list[Block]:
    """The collapse diagnostics of the searches (Hessian eigenvalue, edge entropy, parameter-free op counts) and
    where an early stop ended a run."""
    plot = collapse_plot(runs, out / "collapse.png")
    if plot is None:
        return []
    report.plots.append(plot)
    blocks: list[Block] = [Heading(2, "Collapse diagnostics"), Image(plot.file, ", ".join(plot.panels)),
                           Items(tuple((f"{name}: {_count(len(labels), 'run')}: ", ", ".join(labels))
                                       for name, labels in plot.panels.items()))]
    stops = [(run, stop) for run in runs if (stop := early_stop(run)) is not None]
    if stops:
        blocks.append(Para("Dashed lines mark the epoch whose genotype an early stop returned."))
        blocks.append(Items(tuple(
            (f"{run.label} ({run.experiment}): ", f"early_stop={stop.get('rule')} after epoch {stop.get('epoch')}, "
                                                  f"genotype of epoch {stop['genotype_epoch']}: {stop.get('reason')}")
            for run, stop in stops)))
    return blocks


def _cells(run: Run, stem: str, out: Path, report: Report) -> list[Block]:
    """The final genotype as text and as one SVG per cell."""
    assert run.genotype is not None
    blocks: list[Block] = [Items((("final genotype: ", json.dumps(to_dict(run.genotype))),))]
    for which, cell in genotype_cells(run.genotype, f"{run.label} {run.experiment}").items():
        path = out / f"cell_{stem}_{which}.svg"
        path.write_text(cell_svg(cell), encoding="utf-8")
        report.svgs.append(path)
        blocks.append(Image(path.name, cell.title))
    return blocks


def _alphas(run: Run, stem: str, out: Path, report: Report) -> list[Block]:
    plot = alpha_heatmap(run, out / f"alphas_{stem}.png")
    report.plots.append(plot)
    epoch = run.alphas[0] if run.alphas else None
    return [Heading(4, f"Alpha softmax, epoch {NONE if epoch is None else epoch}"), Image(plot.file, plot.file)]


def _changes(run: Run) -> list[Block]:
    """When the derived genotype changed over the search, and by how many edges."""
    rows = genotype_changes(run.history)
    changed = [row[0] for row in rows[1:]]
    recorded = f"{_count(len(run.history), 'epoch')} recorded"
    summary = (f"{recorded}; the genotype changed at epoch {', '.join(changed)}." if changed
               else f"{recorded}; the genotype did not change after epoch {rows[0][0]}.")
    return [Heading(4, "Genotype changes"), Para(summary),
            Table(("epoch", "edges changed", "changes"), tuple(tuple(row) for row in rows))]


def _run_details(run: Run, stem: str, out: Path, report: Report) -> list[Block]:
    """A run's own section: cells, alphas, genotype changes (whichever it has)."""
    blocks: list[Block] = []
    if run.genotype is not None:
        blocks += _guarded(f"{run.label}: cell drawing", run.notes, lambda: _cells(run, stem, out, report))
    if run.alphas is not None:
        blocks += _guarded(f"{run.label}: alpha heatmap", run.notes, lambda: _alphas(run, stem, out, report))
    if run.history:
        blocks += _changes(run)
    return [Heading(3, f"{run.label} ({run.experiment})"), *blocks] if blocks else []


def build_report(paths: list[Path | str], out: Path, now: datetime | None = None,
                 stale_after: float = STALE_AFTER) -> Report:
    """Read the runs under `paths` (folders, or database URLs) and write `out`/report.md, report.html and their
    images."""
    with tempfile.TemporaryDirectory(prefix="darts-report-") as exported:
        folders = [Path(p) for p in paths if not is_database_url(str(p))]
        for url in (str(p) for p in paths if is_database_url(str(p))):
            try:
                folders += export_runs(url, Path(exported) / _file_stem(shown_url(url), set()))
            except ConfigError as error:
                raise ReportError(str(error)) from None
        return _build(folders, [shown_url(str(p)) for p in paths], out, now, stale_after)


def _build(paths: list[Path], shown: list[str], out: Path, now: datetime | None, stale_after: float) -> Report:
    folders, skipped = discover(paths, skip=out)
    inside = [f for f in folders if f == out.resolve() or f in out.resolve().parents]
    if inside:
        raise ReportError(f"--out {out} is inside the run folder {inside[0]}: choose a folder outside the runs")
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(folder) for folder in folders]
    assign_labels(runs)
    report = Report(out / "report.md", out / "report.html", runs)
    now = now or utc_now()
    blocks: list[Block] = [Heading(1, "DARTS runs report"), Para(
        f"{len(runs)} runs from {', '.join(shown)}, read {now:%Y-%m-%d %H:%M} UTC.")]
    details: list[Block] = []
    taken: set[str] = set()
    for run in runs:  # drawn first: a drawing step that fails adds a note to its run
        details += _run_details(run, _file_stem(run.label, taken), out, report)
    curves = _curves(runs, out, report) + _guarded("collapse plot", skipped, lambda: _collapse(runs, out, report))
    blocks += _runs_table(runs, now, stale_after) + _problems(runs, skipped) + _config_differences(runs) + curves
    blocks += [Heading(2, "Genotypes, alphas and genotype changes"), *details] if details else []
    report.markdown.write_text(to_markdown(blocks), encoding="utf-8")
    report.html.write_text(to_html(blocks, "DARTS runs report"), encoding="utf-8")
    return report


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="Sacred run folders, folders holding numbered run folders, or database URLs "
                             "(mongodb://host/db, postgresql://host/db; URL#3,7 for some of its runs)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for report.md, report.html and their images (created if missing)")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER, metavar="SECONDS",
                        help="call a RUNNING run's heartbeat old after this many seconds (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2: a RUNS path or --out that cannot work)."""
    args = _parser().parse_args(argv)
    missing = [path for path in args.runs if not is_database_url(path) and not Path(path).exists()]
    try:
        if missing:
            raise ReportError(f"{missing[0]} does not exist: RUNS are run folders or folders of run folders")
        if not 0 < args.stale_after < math.inf:
            raise ReportError(f"--stale-after must be a positive number of seconds, got {args.stale_after}")
        report = build_report(args.runs, args.out, stale_after=args.stale_after)
    except ReportError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # --out under a file, read-only, full
        print(f"report: error: cannot write the report to {args.out} ({error.strerror or error}): pass another "
              f"--out", file=sys.stderr)
        return 2
    print(f"wrote {report.markdown} and {report.html} ({len(report.runs)} runs)")
    return 0
