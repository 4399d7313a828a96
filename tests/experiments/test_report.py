"""`python -m experiments.report` over fabricated Sacred run folders: two searches, a training, a failed, a running,
an interrupted run with broken files, Sacred's `_sources` and a folder that is not a run."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from experiments import report
from experiments.report.runs import Run, assign_labels, discover
from experiments.report.tables import duration, genotype_changes, status
from shared.genotypes import from_dict, published, to_dict
from tests.conftest import REPO

NOW = datetime.now(timezone.utc).replace(tzinfo=None)  # Sacred stamps naive UTC times
RNN_G1 = {"space": "rnn", "recurrent": [["tanh", 0], ["relu", 1], ["sigmoid", 1], ["identity", 2]],
          "concat": [1, 2, 3, 4]}
RNN_G2 = {"space": "rnn", "recurrent": [["tanh", 0], ["relu", 0], ["sigmoid", 1], ["relu", 2]],
          "concat": [1, 2, 3, 4]}  # recurrent[1] and recurrent[3] differ from RNN_G1
CNN_G = to_dict(published("cnn", "DARTS_V2"))
RNN_TRAIN_G = to_dict(published("rnn", "DARTS_V2"))
ERROR = "shared.errors.ConfigError: order must be one of first, second, exact, got 'third'"


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def _softmax_rows(rows: int, cols: int, shift: int = 0) -> list[list[float]]:
    out = []
    for r in range(rows):
        weights = [math.exp(((r + c + shift) % cols) / 4) for c in range(cols)]
        out.append([w / sum(weights) for w in weights])
    return out


def _metric(steps: list[int], values: list[float], when: datetime) -> dict[str, list]:
    return {"steps": steps, "timestamps": [_iso(when + timedelta(seconds=s)) for s in steps], "values": values}


def write_run(folder: Path, experiment: str, config: dict[str, Any], status: str = "COMPLETED",
              per_epoch: dict[str, list[float]] | None = None, at_end: dict[str, float] | None = None,
              info: dict[str, Any] | None = None, result: Any = None, artifacts: dict[str, Any] | None = None,
              start: datetime = NOW - timedelta(hours=1), seconds: float | None = 125.0,
              fail_trace: list[str] | None = None) -> Path:
    """A run folder as Sacred's FileStorageObserver writes it (run.json, config.json, metrics.json, info.json,
    cout.txt, and JSON artifacts). `seconds=None`: no stop_time, heartbeat only (a RUNNING run)."""
    folder.mkdir(parents=True)
    per_epoch, at_end, artifacts = per_epoch or {}, at_end or {}, artifacts or {}
    epochs = max((len(v) for v in per_epoch.values()), default=0)
    metrics = {name: _metric(list(range(1, len(v) + 1)), v, start) for name, v in per_epoch.items()}
    metrics.update({name: _metric([epochs], [v], start) for name, v in at_end.items()})
    beat = start + timedelta(seconds=seconds or 0)
    run = {"artifacts": sorted(artifacts), "command": "main", "heartbeat": _iso(beat),
           "experiment": {"base_dir": str(REPO / "experiments"), "dependencies": ["sacred==0.8.7"],
                          "mainfile": f"{experiment}.py", "name": experiment, "repositories": [], "sources": []},
           "host": {"ENV": {}, "cpu": "AMD EPYC", "hostname": "vm", "python_version": "3.11.7"},
           "meta": {"command": "main", "config_updates": {}, "named_configs": ["smoke"]},
           "resources": [], "result": result, "start_time": _iso(start), "status": status}
    if seconds is not None and status != "RUNNING":
        run["stop_time"] = _iso(beat)
    if fail_trace is not None:
        run["fail_trace"] = fail_trace
    files = {"run.json": run, "config.json": config, "metrics.json": metrics,
             "info.json": {"git": {"commit": "f" * 40, "dirty": False}, **(info or {})}, **artifacts}
    for name, data in files.items():
        (folder / name).write_text(data if isinstance(data, str) else json.dumps(data, sort_keys=True, indent=2))
    (folder / "cout.txt").write_text(f"INFO - {experiment} - Running command 'main'\n")
    return folder


STOP = {"rule": "skip", "epoch": 2, "genotype_epoch": 2, "reason": "skip_connect_normal reached 2 (early_stop_skips=2)"}


def _search_config(seed: int, order: str, epochs: int, **extra: Any) -> dict[str, Any]:
    return {"seed": seed, "order": order, "epochs": epochs, "threads": 2, "resume": None, **extra}


def build_runs(root: Path) -> Path:
    """runs/1 RNN search, 2 CNN search, 3 RNN training, 4 failed, 5 running (stale), 6 interrupted with broken
    files; plus _sources and a folder that is no run."""
    runs = root / "runs"
    history = [{"epoch": 1, "genotype": RNN_G1}, {"epoch": 2, "genotype": RNN_G2}, {"epoch": 3, "genotype": RNN_G2}]
    write_run(runs / "1", "rnn_search", _search_config(3, "second", 3, learning_rate=5.0),
              per_epoch={"train_ppl": [900.0, 800.0, 780.0], "valid_ppl": [800.0, 700.0, 750.0],
                         "train_loss": [6.8, 6.7, 6.65], "valid_loss": [6.7, 6.55, 6.62], "identity_share": [0, 0, 0],
                         "hessian_eigenvalue": [0.1, 0.2, 0.4], "edge_entropy": [1.6, 1.5, 1.3]},
              info={"genotype": RNN_G2, "genotype_history": history, "epochs_done": 3,
                    "alphas": {"alphas": _softmax_rows(10, 5)}},
              result={"genotype": RNN_G2, "valid_ppl": 750.0, "best_valid_ppl": 700.0},
              artifacts={"genotype.json": RNN_G2, "genotype_history.json": history,
                         "alphas.json": [{"epoch": e, "alphas": {"alphas": _softmax_rows(10, 5, e)}}
                                         for e in (1, 2, 3)]})
    cnn_history = [{"epoch": 1, "genotype": CNN_G}, {"epoch": 2, "genotype": CNN_G}]
    write_run(runs / "2", "cnn_search", _search_config(2, "first", 2, learning_rate=0.025, strategy="random"),
              per_epoch={"train_acc": [0.4, 0.55], "valid_acc": [0.5, 0.6], "skip_connect_normal": [1.0, 2.0],
                         "hessian_eigenvalue": [0.3, 0.35]},
              info={"epochs_done": 2, "early_stop": STOP, "alphas": {"alphas_normal": _softmax_rows(14, 8),
                                                 "alphas_reduce": _softmax_rows(14, 8, 3)}},
              artifacts={"genotype.json": CNN_G, "genotype_history.json": cnn_history})  # genotype from the artifact
    write_run(runs / "3", "rnn_train", {"seed": 5, "epochs": 2, "threads": 2, "learning_rate": 20.0, "only_here": 1},
              per_epoch={"train_ppl": [400.0, 280.0], "valid_ppl": [300.0, 250.0], "epoch_time": [10.0, 10.0]},
              at_end={"test_ppl": 240.5, "test_loss": 5.48}, result={"valid_ppl": 250.0, "test_ppl": 240.5},
              info={"genotype": RNN_TRAIN_G, "genotype_source": "published rnn/DARTS_V2",
                    "num_parameters": 1234567, "epochs_done": 2})
    write_run(runs / "4", "rnn_search", _search_config(4, "third", 3), status="FAILED", seconds=1.0,
              fail_trace=["Traceback (most recent call last):\n", '  File "x.py", line 1, in main\n', ERROR + "\n"])
    write_run(runs / "5", "cnn_train", {"seed": 6, "epochs": 10, "threads": 2}, status="RUNNING",
              per_epoch={"valid_acc": [0.7], "train_acc": [0.65]}, info={"epochs_done": 1, "num_parameters": 3000},
              start=NOW - timedelta(hours=4), seconds=3600.0)  # last heartbeat 3 h ago
    broken = write_run(runs / "6", "rnn_search", _search_config(3, "second", 3, strategy="reinforce"),
                       status="INTERRUPTED")
    (broken / "metrics.json").write_text("{not json")
    (broken / "alphas.json").write_text("[{")
    (runs / "_sources").mkdir()
    (runs / "_sources" / "rnn_search_0123.py").write_text("print('source')\n")
    (runs / "notes").mkdir()  # not a run
    return runs


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, report.Report, str, str, dict[str, str], dict[str, str]]:
    root = tmp_path_factory.mktemp("report")
    runs = build_runs(root)
    before = _digest(runs)
    result = report.build_report([runs], root / "out")
    assert report.main([str(runs), "--out", str(root / "cli")]) == 0
    md, html = (root / "cli" / "report.md").read_text(), (root / "cli" / "report.html").read_text()
    return root, result, md, html, before, _digest(runs)


def md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (the header first, the --- line dropped)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
            if not all(c == "---" for c in cells):
                current.append(cells)
        elif current:
            tables, current = tables + [current], []
    return tables


class _HTMLTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def runs_table(md: str) -> dict[str, dict[str, str]]:
    header, *rows = md_tables(md.split("## Runs\n", 1)[1])[0]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_runs_table_has_one_row_per_run_with_status_values_and_parameters(built) -> None:
    table = runs_table(built[2])
    assert sorted(table) == ["1", "2", "3", "4", "5", "6"]
    assert {k: row["status"] for k, row in table.items()} == {
        "1": "COMPLETED", "2": "COMPLETED", "3": "COMPLETED", "4": "FAILED",
        "5": "RUNNING? last heartbeat 3 h ago", "6": "INTERRUPTED"}
    assert table["1"]["experiment"] == "rnn_search" and table["1"]["order"] == "second"
    assert [table[k]["strategy"] for k in "1236"] == ["darts", "random", "–", "reinforce"]  # no key: darts
    assert (table["1"]["best valid"], table["1"]["final valid"]) == ("700.00 ppl", "750.00 ppl")
    assert (table["2"]["best valid"], table["2"]["final valid"], table["2"]["order"]) == ("60.00% acc", "60.00% acc",
                                                                                          "first")
    assert (table["3"]["test"], table["3"]["parameters"], table["3"]["order"]) == ("240.50 ppl", "1,234,567", "–")
    assert table["3"]["best valid"] == "250.00 ppl" and table["1"]["test"] == "–"
    assert [table[k]["epochs"] for k in "12345"] == ["3 / 3", "2 / 2", "2 / 2", "– / 3", "1 / 10"]
    assert [table[k]["seed"] for k in "1234"] == ["3", "2", "5", "4"]
    assert table["1"]["wall time"] == "2 min 05 s" and table["4"]["wall time"] == "1 s"
    assert table["5"]["wall time"] == "1 h 00 min (to last heartbeat)"
    assert table["5"]["parameters"] == "3,000" and table["5"]["best valid"] == "70.00% acc"


def test_config_differences_list_only_shared_keys_that_differ(built) -> None:
    md = built[2]
    header, *rows = md_tables(md.split("## Config differences\n", 1)[1])[0]
    # not threads (equal), not only_here (one run); strategy differs between runs 2 (random) and 6 (reinforce)
    assert header == ["id", "epochs", "learning_rate", "order", "seed", "strategy"]
    values = {row[0]: row[1:] for row in rows}
    assert values["1"] == ["3", "5.0", "second", "3", "–"] and values["3"] == ["2", "20.0", "–", "5", "–"]
    assert values["4"][2] == "third"


def test_failed_run_error_line_and_notes_on_broken_runs(built) -> None:
    md = built[2]
    failed = md.split("## Failed runs\n", 1)[1].split("\n## ", 1)[0]
    assert f"4 (rnn_search): `{ERROR}`" in failed and "Traceback" not in md
    notes = md.split("## Notes\n", 1)[1].split("\n## ", 1)[0]
    assert "notes: not a run folder (no run.json), skipped" in notes
    assert "6: metrics.json unparsable" in notes and "6: alphas.json unparsable" in notes
    assert "_sources" not in notes
    assert "3: genotype_source `\"published rnn/DARTS_V2\"`" in notes


def test_html_has_the_same_tables_as_markdown(built) -> None:
    md, html = built[2], built[3]
    parser = _HTMLTables()
    parser.feed(html)
    assert parser.tables == md_tables(md)
    assert len(parser.tables) == 4  # runs, config differences, genotype changes of the two searches
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and 'src="curves_ppl.png"' in html


def _png(path: Path) -> Any:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not blank
    return image


def test_curves_plot_one_line_per_run_with_the_metric(built) -> None:
    root, result = built[0], built[1]
    plots = {plot.file: plot.panels for plot in result.plots}
    assert plots["curves_ppl.png"] == {"valid_ppl": ("1 rnn_search", "3 rnn_train"),
                                       "train_ppl": ("1 rnn_search", "3 rnn_train")}
    assert plots["curves_acc.png"] == {"valid_acc": ("2 cnn_search", "5 cnn_train"),
                                       "train_acc": ("2 cnn_search", "5 cnn_train")}
    for name in ("curves_ppl.png", "curves_acc.png"):
        _png(root / "out" / name)
    assert "- valid_ppl: 2 runs: `1 rnn_search, 3 rnn_train`" in built[2]


def test_collapse_plot_has_a_panel_per_recorded_signal_and_marks_the_early_stop(built) -> None:
    root, result, md = built[0], built[1], built[2]
    panels = {plot.file: plot.panels for plot in result.plots}["collapse.png"]
    assert panels == {"hessian_eigenvalue": ("1 rnn_search", "2 cnn_search", "2 early stop: epoch 2"),
                      "edge_entropy": ("1 rnn_search",),
                      "skip_connect_normal": ("2 cnn_search", "2 early stop: epoch 2"),
                      "identity_share": ("1 rnn_search",)}
    _png(root / "out" / "collapse.png")
    assert ("- 2 (cnn_search): `early_stop=skip after epoch 2, genotype of epoch 2: skip_connect_normal reached 2 "
            "(early_stop_skips=2)`") in md


def test_alpha_heatmaps_for_searches_with_alphas(built) -> None:
    root, result = built[0], built[1]
    heatmaps = {plot.file: plot.panels for plot in result.plots if plot.file.startswith("alphas_")}
    assert heatmaps == {"alphas_1.png": {"alphas": ()}, "alphas_2.png": {"alphas_normal": (), "alphas_reduce": ()}}
    assert _png(root / "out" / "alphas_2.png").shape[1] > _png(root / "out" / "alphas_1.png").shape[1]
    assert "Alpha softmax, epoch 3" in built[2]  # the last epoch of alphas.json


@pytest.mark.parametrize("stem, genotype, cells", [("1", RNN_G2, ("recurrent",)), ("2", CNN_G, ("normal", "reduce")),
                                                   ("3", RNN_TRAIN_G, ("recurrent",))])
def test_cells_are_svg_with_every_op_of_the_genotype(built, stem: str, genotype: dict, cells: tuple[str, ...]) -> None:
    root = built[0]
    for cell in cells:
        svg = ET.parse(root / "out" / f"cell_{stem}_{cell}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
        ops = [op for op, _ in genotype[cell]]
        assert sorted(t for t in texts if t in set(ops)) == sorted(ops)  # one label per edge
        assert len(list(svg.iter("{http://www.w3.org/2000/svg}path"))) >= len(ops)
        assert f"(cell_{stem}_{cell}.svg)" in built[2]


def test_genotype_change_table_lists_the_epochs_it_changed(built) -> None:
    md = built[2]
    section = md.split("### 1 (rnn_search)\n", 1)[1].split("\n### ", 1)[0]
    header, *rows = md_tables(section)[0]
    assert header == ["epoch", "edges changed", "changes"]
    assert [row[:2] for row in rows] == [["1", "–"], ["2", "2"]]  # epoch 3 repeats epoch 2
    assert rows[1][2] == "recurrent[1]: relu(1) → relu(0); recurrent[3]: identity(2) → relu(2)"
    cnn = md.split("### 2 (cnn_search)\n", 1)[1].split("\n### ", 1)[0]
    assert "did not change after epoch 1" in cnn


def test_run_folders_are_never_written(built) -> None:
    assert built[4] == built[5]


def test_subprocess_command_line(built, tmp_path) -> None:
    runs = built[0] / "runs"
    proc = subprocess.run([sys.executable, "-m", "experiments.report", str(runs / "1"), str(runs / "3"), "--out",
                           str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 runs" not in proc.stdout and "(2 runs)" in proc.stdout
    table = runs_table((tmp_path / "r" / "report.md").read_text())
    assert sorted(table) == ["1", "3"] and table["3"]["test"] == "240.50 ppl"


def test_missing_runs_path_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    code = report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope does not exist" in err
    assert not (tmp_path / "out").exists()


def test_out_inside_a_run_folder_is_refused(built, capsys) -> None:
    run = built[0] / "runs" / "1"
    assert report.main([str(run), "--out", str(run / "report")]) == 2
    assert "inside the run folder" in capsys.readouterr().err and not (run / "report").exists()


def test_broken_run_json_and_empty_folder_are_stated(tmp_path) -> None:
    (tmp_path / "runs" / "7").mkdir(parents=True)
    (tmp_path / "runs" / "7" / "run.json").write_text("not json")
    (tmp_path / "empty").mkdir()
    result = report.build_report([tmp_path / "runs", tmp_path / "empty"], tmp_path / "out")
    md = result.markdown.read_text()
    assert runs_table(md)["7"]["status"] == "?"
    assert "7: run.json unparsable" in md and "7: config.json missing" in md and "7: metrics.json missing" in md
    assert "empty: not a run folder (no run.json) and holds no run folders" in md
    assert "No run has per-epoch" in md


def test_labels_use_the_path_when_folder_names_clash(tmp_path) -> None:
    runs = [Run(path=tmp_path / "a" / "1"), Run(path=tmp_path / "b" / "1"), Run(path=tmp_path / "b" / "2")]
    assign_labels(runs)
    assert [run.label for run in runs] == ["a/1", "b/1", "b/2"]


def test_discover_orders_numbered_runs_and_skips_sources(tmp_path) -> None:
    for name in ("10", "2", "_sources"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
    found, notes = discover([tmp_path])
    assert [p.name for p in found] == ["2", "10"] and notes == []
    assert discover([tmp_path / "2" / "run.json", tmp_path / "2"])[0] == [(tmp_path / "2").resolve()]


def test_genotype_changes_count_edges_and_concat() -> None:
    g1, g2 = from_dict(RNN_G1), from_dict({**RNN_G1, "recurrent": [["relu", 0]] + RNN_G1["recurrent"][1:],
                                           "concat": [1, 2]})
    rows = genotype_changes([(1, g1), (2, g1), (3, g2), (4, g1)])
    assert [row[:2] for row in rows] == [["1", "–"], ["3", "1"], ["4", "1"]]
    assert rows[1][2] == "recurrent[0]: tanh(0) → relu(0); concat: 1,2,3,4 → 1,2"


@pytest.mark.parametrize("seconds, coarse, text", [(38, False, "38 s"), (725, False, "12 min 05 s"),
                                                   (3 * 3600 + 120, False, "3 h 02 min"),
                                                   (3 * 3600 + 120, True, "3 h"), (2 * 86400 + 3 * 3600, False,
                                                                                   "2 d 03 h")])
def test_duration(seconds: float, coarse: bool, text: str) -> None:
    assert duration(seconds, coarse) == text


@pytest.mark.parametrize("age, expected", [(30, "RUNNING"), (7200, "RUNNING? last heartbeat 2 h ago")])
def test_running_status_says_when_the_heartbeat_is_old(age: float, expected: str) -> None:
    run = Run(path=Path("1"), run={"status": "RUNNING", "heartbeat": _iso(NOW - timedelta(seconds=age))})
    assert status(run, NOW, stale_after=600) == expected


def test_the_unigram_floor_is_drawn_on_the_valid_perplexity_curves_only(tmp_path: Path) -> None:
    for k, unigram in enumerate((687.0, 687.0, 120.5), start=1):  # two runs on one corpus, one on another
        write_run(tmp_path / "runs" / str(k), "rnn_search", {"epochs": 3},
                  per_epoch={"train_ppl": [900.0, 700.0, 600.0], "valid_ppl": [800.0, 650.0, 500.0]},
                  info={"unigram_valid_ppl": unigram})
    result = report.build_report([tmp_path / "runs"], tmp_path / "out")
    [plot] = [p for p in result.plots if p.file == "curves_ppl.png"]
    assert [label for label in plot.panels["valid_ppl"] if label.startswith("unigram")] == [
        "unigram 120.5", "unigram 687"]
    assert not [label for label in plot.panels["train_ppl"] if label.startswith("unigram")]
