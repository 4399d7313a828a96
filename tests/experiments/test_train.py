"""Training a cell from scratch as a user runs it, for both spaces: the three genotype sources, records, the test
metric, resume, one-line errors and real-data smokes (the printed config: test_configs.py)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments.report import build_report
from shared.genotypes import published, to_dict
from tests.conftest import RunResult, real_data, run_experiment
from tests.experiments.conftest import TRAIN_TINY, tiny_data, tiny_search


@dataclass(frozen=True)
class Space:
    name: str  # rnn | cnn
    curves: tuple[str, ...]  # metrics logged every epoch
    test_metric: str

    @property
    def module(self) -> str:
        return f"{self.name}_train"

    def train(self, tmp_path: Path, *args: str, runs: Path | None = None) -> RunResult:
        return run_experiment(self.module, "with", "smoke", f"data_dir={tiny_data(self.name, tmp_path)}",
                              *TRAIN_TINY[self.name], *args, runs=runs or tmp_path / "runs")


RNN = Space("rnn", ("train_loss", "train_ppl", "valid_loss", "valid_ppl", "averaged", "epoch_time"), "test_ppl")
CNN = Space("cnn", ("train_loss", "train_acc", "valid_loss", "valid_acc", "drop_path_prob", "epoch_time"), "test_acc")
SPACES = pytest.mark.parametrize("space", [RNN, CNN], ids=["rnn", "cnn"])


def info(result: RunResult) -> dict:
    return json.loads((result.run_dir() / "info.json").read_text())


@SPACES
def test_a_training_from_a_published_name_records_curves_test_and_parameters(space: Space, tmp_path: Path) -> None:
    result = space.train(tmp_path, "epochs=2")
    assert result.returncode == 0, result.stderr
    metrics, record = result.metrics(), info(result)
    for name in space.curves:
        assert metrics[name]["steps"] == [1, 2], name
        assert all(math.isfinite(v) for v in metrics[name]["values"]), name
    assert metrics[space.test_metric]["steps"] == [2] and math.isfinite(metrics[space.test_metric]["values"][0])
    assert record["genotype"] == to_dict(published(space.name, "DARTS_V2"))
    assert record["genotype_source"] == f"published {space.name}/DARTS_V2"
    assert record["num_parameters"] > 0 and f"{record['num_parameters']:,} parameters" in result.stderr
    assert "genotype_history" not in record and "alphas" not in record  # a training has no search records
    assert json.loads((result.run_dir() / "genotype.json").read_text()) == record["genotype"]
    assert (result.run_dir() / "checkpoint.pt").is_file()
    outcome = result.result()
    assert outcome[space.test_metric] == metrics[space.test_metric]["values"][0]
    assert outcome["num_parameters"] == record["num_parameters"]


@SPACES
def test_a_training_from_a_genotype_file_records_the_file(space: Space, tmp_path: Path) -> None:
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(to_dict(published(space.name, "DARTS_V1"))))
    result = space.train(tmp_path, "epochs=1", f"genotype_from={path}")
    assert result.returncode == 0, result.stderr
    assert info(result)["genotype"] == to_dict(published(space.name, "DARTS_V1"))
    assert info(result)["genotype_source"] == str(path)


@SPACES
def test_a_training_from_a_search_run_folder_takes_its_final_genotype(space: Space, tmp_path: Path) -> None:
    search = tiny_search(space.name, tmp_path, "epochs=2", runs=tmp_path / "searches")
    assert search.returncode == 0, search.stderr
    folder = search.run_dir()
    result = space.train(tmp_path, "epochs=1", f"genotype_from={folder}")
    assert result.returncode == 0, result.stderr
    assert info(result)["genotype"] == search.result()["genotype"]
    assert info(result)["genotype_source"] == str(folder / "genotype.json")
    # The report reads both real runs: a search row with its order, a training row with its test value.
    report = build_report([tmp_path / "searches", tmp_path / "runs"], tmp_path / "report")
    assert [(run.experiment, run.run["status"]) for run in report.runs] == [
        (f"{space.name}_search", "COMPLETED"), (space.module, "COMPLETED")]
    table = report.markdown.read_text()
    test_value = result.metrics()[space.test_metric]["values"][0]
    shown = f"{test_value:.2f} ppl" if space.name == "rnn" else f"{100 * test_value:.2f}% acc"
    assert f"| {space.module} | COMPLETED | – |" in table and shown in table
    assert f"{info(result)['num_parameters']:,}" in table


@SPACES
def test_a_resumed_training_equals_an_uninterrupted_one(space: Space, tmp_path: Path) -> None:
    whole = space.train(tmp_path, "epochs=2", runs=tmp_path / "whole")
    first = space.train(tmp_path, "epochs=2", "time_limit=1e-9")  # stops after its first epoch
    assert whole.returncode == 0 and first.returncode == 0, whole.stderr + first.stderr
    assert space.test_metric not in first.metrics(1)  # a run the time limit stopped is not tested
    resumed = space.train(tmp_path, "epochs=2", f"resume={first.run_dir(1)}")
    assert resumed.returncode == 0, resumed.stderr
    for name in space.curves[:-1] + (space.test_metric,):  # all but the epoch time
        assert resumed.metrics(2)[name]["values"] == whole.metrics()[name]["values"], name


@SPACES
@pytest.mark.parametrize("spec, message", [
    ("DARTS_V9", "genotype 'DARTS_V9' is not a published name (DARTS_V1, DARTS_V2), a genotype JSON file or a "
                 "search run folder"),
    ("other-space", "holds a {other} genotype; this training needs a {space} one"),
])
def test_a_bad_genotype_source_is_one_clear_line(space: Space, spec: str, message: str, tmp_path: Path) -> None:
    other = "cnn" if space.name == "rnn" else "rnn"
    if spec == "other-space":
        spec = str(tmp_path / "other.json")
        Path(spec).write_text(json.dumps(to_dict(published(other, "DARTS_V2"))))
    result = space.train(tmp_path, f"genotype_from={spec}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message.format(other=other, space=space.name) in result.stderr
    assert result.run_json()["status"] == "FAILED"


@SPACES
def test_a_resume_must_train_the_checkpoints_genotype(space: Space, tmp_path: Path) -> None:
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(to_dict(published(space.name, "DARTS_V2"))))
    first = space.train(tmp_path, "epochs=2", "time_limit=1e-9", f"genotype_from={path}")
    assert first.returncode == 0, first.stderr
    path.write_text(json.dumps(to_dict(published(space.name, "DARTS_V1"))))  # the file changed since
    result = space.train(tmp_path, "epochs=2", f"genotype_from={path}", f"resume={first.run_dir(1)}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "resume: the checkpoint trained the cell" in result.stderr
    assert "resume with the genotype the run started from" in result.stderr


@SPACES
def test_a_failed_search_run_folder_is_refused_in_one_line(space: Space, tmp_path: Path) -> None:
    search = tiny_search(space.name, tmp_path, f"data_dir={tmp_path / 'missing'}", runs=tmp_path / "searches")  # fails
    assert search.run_json()["status"] == "FAILED"
    result = space.train(tmp_path, f"genotype_from={search.run_dir()}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{search.run_dir()} is a FAILED run" in result.stderr
    assert f"genotype_from={search.run_dir() / 'genotype.json'}" in result.stderr


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_training_on_real_ptb_learns(tmp_path: Path) -> None:
    result = run_experiment("rnn_train", "with", "smoke", f"data_dir={real_data('ptb')}", runs=tmp_path / "runs",
                            timeout=1200)
    assert result.returncode == 0, result.stderr
    valid = result.metrics()["valid_ppl"]["values"]
    assert all(math.isfinite(v) for v in valid) and valid[-1] < valid[0], valid
    assert result.metrics()["test_ppl"]["values"][0] < 1000  # far below the 10,000 of a uniform guess
    assert info(result)["num_parameters"] == result.result()["num_parameters"]


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_training_on_real_cifar10_learns(tmp_path: Path) -> None:
    result = run_experiment("cnn_train", "with", "smoke", f"data_dir={real_data('cifar10')}",
                            runs=tmp_path / "runs", timeout=1200)
    assert result.returncode == 0, result.stderr
    metrics = result.metrics()
    assert metrics["valid_acc"]["values"][-1] > 0.15 and metrics["test_acc"]["values"][0] > 0.15  # chance: 0.10
    assert metrics["train_loss"]["values"][-1] < metrics["train_loss"]["values"][0]
