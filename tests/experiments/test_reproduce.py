"""Reproducing a logged run from its record: the same numbers, every difference named, warnings about changed code,
one-line errors for bad input, and the old run folder never touched."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from experiments.tracking.experiment import package_sources
from experiments.reproduce import Record, main, source_changes
from tests.conftest import REPO, run_experiment
from tests.experiments.conftest import TINY
from tests.rnn_darts.test_search import write_corpus

# The tiny search of test_rnn_search on a few hundred tokens: a few seconds per epoch.
SHORT = ("train_tokens=240", "eval_tokens=120")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/1: a one-epoch tiny search; runs/2: it resumed to two epochs. Each test gets its own copy."""
    root = tmp_path_factory.mktemp("reproduce")
    corpus = write_corpus(root / "corpus")
    search = ("with", "smoke", f"data_dir={corpus}", *TINY["rnn"], *SHORT)
    first = run_experiment("rnn_search", *search, "epochs=1", runs=root / "runs")
    resumed = run_experiment("rnn_search", *search, "epochs=2", f"resume={root / 'runs' / '1'}", runs=root / "runs")
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr + resumed.stderr
    return root / "runs"


@pytest.fixture
def copied(runs: Path, tmp_path: Path) -> Path:
    """A copy of the runs folder (runs/2 still resumes from the original runs/1's checkpoint)."""
    return Path(shutil.copytree(runs, tmp_path / "runs"))


def reproduce(folder: Path, runs: Path):
    return run_experiment("reproduce", str(folder), "--runs-dir", str(runs), runs=runs)


def edited_since(folder: Path) -> set[str]:
    """The recorded source files whose current md5 is not the one in their stored name."""
    sources = json.loads((folder / "run.json").read_text())["experiment"]["sources"]
    return {name for name, stored in sources if (REPO / name).is_file()
            and not stored.endswith(f"_{hashlib.md5((REPO / name).read_bytes()).hexdigest()}.py")}


@contextmanager
def edited(path: Path) -> Iterator[dict]:
    """The JSON object in `path`, written back after the block."""
    data = json.loads(path.read_text())
    yield data
    path.write_text(json.dumps(data))


def test_a_run_records_the_experiment_module_and_every_source_of_our_packages(runs: Path) -> None:
    experiment = json.loads((runs / "1" / "run.json").read_text())["experiment"]
    assert experiment["mainfile"] == "experiments/rnn_search.py"
    assert Path(experiment["base_dir"]) == REPO
    recorded = {name: stored for name, stored in experiment["sources"]}
    for package in ("shared", "rnn_darts", "cnn_darts", "experiments"):
        assert any(name.startswith(f"{package}/") for name in recorded), package
    assert {"experiments/rnn_search.py", "experiments/tracking/runs.py", "shared/bilevel.py", "rnn_darts/supernet.py",
            "cnn_darts/supernet.py"} <= set(recorded)
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in recorded)
    assert {str(p.relative_to(REPO)) for p in package_sources()} >= set(recorded)
    for name, stored in recorded.items():  # the copies in runs/_sources are named by their md5
        copy = runs / stored
        assert copy.name.endswith(f"_{hashlib.md5(copy.read_bytes()).hexdigest()}.py"), name
    assert f"torch=={importlib.metadata.version('torch')}" in experiment["dependencies"]


def test_reproducing_a_run_finds_no_difference_and_records_the_comparison(runs: Path, copied: Path) -> None:
    before = digests(copied)
    result = reproduce(copied / "1", copied)  # the new run goes beside the old one (sharing runs/_sources)
    assert result.returncode == 0, result.stderr
    assert "largest difference: none" in result.stdout
    assert "verdict: IDENTICAL: edge_entropy, edge_entropy_min, identity_ops, identity_share, train_loss, " \
           "train_ppl, valid_loss, valid_ppl, genotype" in result.stdout
    assert "not compared (wall-clock): epoch_time" in result.stdout
    # No warning but for files edited since the fixture's run (none in CI; other work in the checkout may edit some).
    assert "warning: package" not in result.stderr
    warned = set(re.findall(r"^warning: source (\S+): changed since the run$", result.stderr, re.MULTILINE))
    assert warned == edited_since(copied / "1")
    new = result.run_dir()
    assert new.name == "3"
    comparison = json.loads((new / "reproduction.json").read_text())
    assert comparison["identical"] is True and comparison["differences"] == [] and comparison["notes"] == []
    assert comparison["excluded_wall_clock"] == ["epoch_time"]
    info = json.loads((new / "info.json").read_text())
    assert info["reproduces"]["run"] == str((copied / "1").resolve())
    assert info["reproduction"]["identical"] is True and info["reproduction"]["file"] == "reproduction.json"
    assert info["genotype"] == json.loads((copied / "1" / "info.json").read_text())["genotype"]
    after = digests(copied)
    assert {k: v for k, v in after.items() if k in before} == before  # the old run and the old sources untouched
    assert {k for k in after if k.startswith("1/")} == {k for k in before if k.startswith("1/")}  # nothing added


def test_a_resumed_run_is_reproduced_by_resuming_from_the_same_checkpoint(runs: Path, tmp_path: Path) -> None:
    before = digests(runs)
    result = reproduce(runs / "2", tmp_path / "new")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: IDENTICAL" in result.stdout
    info = json.loads((result.run_dir(1) / "info.json").read_text())
    assert info["resumed_from"] == {"checkpoint": str(runs / "1"), "epoch": 1}
    assert result.metrics(1)["valid_ppl"]["steps"] == [1, 2]
    assert digests(runs) == before


def test_an_edited_record_is_reported_metric_epoch_genotype_and_source(copied: Path) -> None:
    old = copied / "2"
    with edited(old / "metrics.json") as metrics:
        metrics["valid_ppl"]["values"][1] = 999.0  # epoch 2
    with edited(old / "info.json") as info:
        first = info["genotype"]["recurrent"][0]
        first[0] = "identity" if first[0] != "identity" else "tanh"
    with edited(old / "run.json") as run:  # as if shared/bilevel.py had changed since the run
        sources = run["experiment"]["sources"]
        sources[[name for name, _ in sources].index("shared/bilevel.py")][1] = f"_sources/bilevel_{'0' * 32}.py"
    before = digests(old)
    result = reproduce(old, copied)
    assert result.returncode == 1, result.stdout + result.stderr
    new_value = result.metrics()["valid_ppl"]["values"][1]
    assert new_value != 999.0
    assert f"largest difference: valid_ppl at epoch 2: old 999.0, new {new_value!r}" in result.stdout
    assert f"valid_ppl: 1 of 2 epochs differ, first at epoch 2; largest at epoch 2: old 999.0, new {new_value!r}" \
        in result.stdout
    assert f"genotype: old {json.dumps(info['genotype'], separators=(',', ':'), sort_keys=True)}, new {{" \
        in result.stdout
    assert "verdict: DIFFERS in genotype, valid_ppl" in result.stdout
    assert "warning: source shared/bilevel.py: changed since the run" in result.stderr
    comparison = json.loads((result.run_dir() / "reproduction.json").read_text())
    assert comparison["differences"] == [{"metric": "valid_ppl", "step": 2, "old": 999.0, "new": new_value}]
    assert "source shared/bilevel.py: changed since the run" in comparison["warnings"]
    assert json.loads((result.run_dir() / "info.json").read_text())["reproduction"]["differs_in"] == [
        "genotype", "valid_ppl"]
    assert digests(old) == before


def test_a_run_without_genotype_is_compared_step_by_step(tmp_path: Path) -> None:
    toy = run_experiment("paper_toy", "with", "smoke", runs=tmp_path)
    assert toy.returncode == 0, toy.stderr
    assert toy.run_json()["experiment"]["mainfile"] == "experiments/paper_toy.py"
    result = reproduce(toy.run_dir(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "largest difference: none\nverdict: IDENTICAL: alpha, w\n" in result.stdout
    assert json.loads((result.run_dir() / "reproduction.json").read_text())["compared"] == {"alpha": 100, "w": 100}


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    result = run_experiment("reproduce", str(tmp_path), runs=tmp_path / "runs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a Sacred run folder (no run.json): pass a numbered run folder such as runs/7"]
    assert not (tmp_path / "runs").exists()


def _corrupt(folder: Path) -> None:
    (folder / "metrics.json").write_text('{"valid_ppl": ')


def _unknown(folder: Path) -> None:
    with edited(folder / "run.json") as run:
        run["experiment"]["name"] = "lstm_search"


def _failed(folder: Path) -> None:
    with edited(folder / "run.json") as run:
        run["status"] = "FAILED"


def _checkpoint_gone(folder: Path) -> None:
    with edited(folder / "config.json") as config:
        config["resume"] = str(folder / "gone" / "checkpoint.pt")


@pytest.mark.parametrize("breakage, message", [
    (_corrupt, "metrics.json is not valid JSON (Expecting value: line 1 column 15 (char 14)): restore the file"),
    (_unknown, "run.json names the experiment 'lstm_search', which is not one of experiments/"),
    (_failed, "did not complete (status FAILED): only a completed run can be compared"),
    (_checkpoint_gone, "gone/checkpoint.pt, which no longer exists (relative paths are taken from the current folder): "
                       "restore that checkpoint"),
], ids=["corrupt-json", "unknown-experiment", "failed-run", "checkpoint-gone"])
def test_bad_input_is_one_line_and_exit_status_2(copied: Path, capsys, breakage, message: str) -> None:
    breakage(copied / "2")
    assert main([str(copied / "2"), "--runs-dir", str(copied / "new")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (copied / "new").exists()


def test_the_new_run_may_not_go_inside_the_old_one(runs: Path, capsys) -> None:
    assert main([str(runs / "1"), "--runs-dir", str(runs / "1" / "again")]) == 2
    assert "is inside the run being reproduced" in capsys.readouterr().err
    assert not (runs / "1" / "again").exists()


def test_a_checkout_named_like_a_package_reads_its_own_sources(tmp_path: Path) -> None:
    """A checkout in a folder called `shared`: the recorded paths are relative to it and must not get a prefix."""
    root = tmp_path / "shared"
    (root / "shared").mkdir(parents=True)
    source = root / "shared" / "x.py"
    source.write_text("x = 1\n")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    run = {"experiment": {"base_dir": str(root), "sources": [["shared/x.py", f"_sources/x_{md5}.py"]]}}
    lines = source_changes(Record(tmp_path, run, {}, {}, {}), root)
    assert not any("shared/x.py" in line for line in lines), lines
    old = {"experiment": {"base_dir": str(root / "experiments"), "sources": [["_sacred.py", "_sources/s_0.py"]]}}
    assert "experiments/_sacred.py: gone since the run" in source_changes(Record(tmp_path, old, {}, {}, {}), root)


def test_a_runs_dir_that_is_a_file_is_one_line_and_exit_status_2(copied: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = digests(copied)
    result = run_experiment("reproduce", str(copied / "1"), "--runs-dir", str(blocker / "sub"), runs=copied)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert lines == [f"error: --runs-dir {blocker / 'sub'} cannot be a folder: {blocker} is a file; pass a folder "
                     f"for the new run"]
    assert "verdict" not in result.stdout and digests(copied) == before
