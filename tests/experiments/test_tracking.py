"""Team tracking as a team uses it: a real PostgreSQL started by the test, MongoDB in process (and a real mongod
where one is on PATH), SQLite; run ids, artifacts, results, one-line errors, reports and reproductions from a URL."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from experiments.report import main as report_main
from experiments.tracking import database, mongo, observers
from shared.errors import ConfigError
from tests.conftest import run_experiment
from tests.experiments.conftest import TINY
from tests.rnn_darts.test_search import write_corpus
from tests.postgres import postgres_server

sa = pytest.importorskip("sqlalchemy")


def report_without_header(runs: str, out: Path) -> str:
    """The report's markdown but its first lines (where the runs came from, when they were read)."""
    assert report_main([runs, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    return "\n".join(line for line in text.splitlines() if " runs from " not in line)


def table_rows(url: str, query: str) -> list[tuple]:
    engine = sa.create_engine(observers.sql_module(url).engine_url(url))
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(query))]


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server() as url:
        yield url


def test_a_search_recorded_in_postgresql_keeps_metrics_one_copy_of_each_artifact_and_reports_like_its_folder(
        tmp_path: Path, postgres_url: str) -> None:
    write_corpus(tmp_path / "corpus")
    recorded = run_experiment("rnn_search", "with", "smoke", f"data_dir={tmp_path / 'corpus'}",
                              *TINY["rnn"], "epochs=2", runs=tmp_path / "team", env={"DARTS_SQL_URL": postgres_url})
    assert recorded.returncode == 0, recorded.stderr
    folder = recorded.run_dir()
    run_id = folder.name
    [(status, result_number)] = table_rows(postgres_url, f"select status, result from run where run_id = '{run_id}'")
    metrics = recorded.metrics()
    assert status == "COMPLETED" and result_number == metrics["valid_ppl"]["values"][-1]
    stored = table_rows(postgres_url, f"select name, step, value from metric where run_id = '{run_id}'")
    assert sorted(stored) == sorted((name, step, value) for name, series in metrics.items()
                                    for step, value in zip(series["steps"], series["values"]))
    artifacts = Counter(name for (name,) in table_rows(
        postgres_url, f"select filename from artifact where run_id = '{run_id}'"))
    assert set(artifacts) == {"tokenizer.json", "genotype.json", "genotype_history.json", "alphas.json",
                              "checkpoint.pt"} and set(artifacts.values()) == {1}  # two epochs, one copy each
    assert json.loads(table_rows(postgres_url, f"select info from run where run_id = '{run_id}'")[0][0])[
        "result"] == recorded.result()
    from_folder = report_without_header(str(folder), tmp_path / "report_folder")
    from_database = report_without_header(f"{postgres_url}#{run_id}", tmp_path / "report_database")
    assert from_database == from_folder and "valid_ppl" in from_database


def test_a_run_from_a_database_reproduces_and_says_where_it_came_from(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'team.db'}"
    first = run_experiment("paper_toy", "with", "smoke", runs=tmp_path / "runs", env={"DARTS_SQL_URL": url})
    assert first.returncode == 0, first.stderr
    again = run_experiment("reproduce", f"{url}#1", "--runs-dir", str(tmp_path / "again"), runs=tmp_path / "runs",
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "IDENTICAL" in again.stdout.upper()
    info = json.loads((tmp_path / "again" / "1" / "info.json").read_text())
    assert info["reproduces"]["run"] == f"{url}#1"
    for target, words in ((url, "names no runs"), (f"{url}#9", "holds no run 9")):
        refused = run_experiment("reproduce", target, runs=tmp_path / "runs", timeout=120)
        assert refused.returncode == 2 and words in refused.stderr and "Traceback" not in refused.stderr


def test_one_id_per_run_free_in_the_folder_and_in_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'team.db'}"
    env = {"DARTS_SQL_URL": url}
    for machine in ("a", "b"):  # two machines, each with its own runs folder, one database
        done = run_experiment("paper_toy", "with", "steps=5", runs=tmp_path / machine, env=env)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.isdigit()) == ["1"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["2"]  # not 1 again
    (tmp_path / "b" / "7").mkdir()  # a folder the database does not know
    done = run_experiment("paper_toy", "with", "steps=5", runs=tmp_path / "b", env=env)
    assert done.returncode == 0 and done.run_dir().name == "8", done.stderr
    assert sorted(r for (r,) in table_rows(url, "select run_id from run")) == ["1", "2", "8"]
    taken = run_experiment("paper_toy", "with", "steps=5", "-i", "1", runs=tmp_path / "b", env=env)
    assert taken.returncode != 0 and "run id 1 is already used by the database" in taken.stderr
    assert "Traceback" not in taken.stderr and not (tmp_path / "b" / "1").exists()
    odd = run_experiment("paper_toy", "with", "steps=5", "-i", "../x", runs=tmp_path / "b", env=env)
    assert odd.returncode != 0 and "-i '../x': a run id is 1-24 letters" in odd.stderr, odd.stderr
    chosen = run_experiment("paper_toy", "with", "steps=5", "-i", "20", runs=tmp_path / "b", env=env)
    assert chosen.returncode == 0 and chosen.run_dir().name == "20", chosen.stderr
    moved = run_experiment("paper_toy", "with", "steps=5", "-F", str(tmp_path / "elsewhere"), runs=tmp_path / "b")
    assert moved.returncode == 0, moved.stderr  # -F moves the run folder (Sacred's would add a second one)
    assert [p.name for p in (tmp_path / "elsewhere").iterdir() if p.name.isdigit()] == ["1"]


@pytest.mark.parametrize("variable, url, words", [
    ("DARTS_MONGO_URL", "mongodb://127.0.0.1:1", "cannot reach MongoDB at mongodb://127.0.0.1:1"),
    ("DARTS_MONGO_URL", "mongodb://host:notaport", "is not a MongoDB URL"),
    ("DARTS_SQL_URL", "postgresql://nobody@127.0.0.1:1/darts", "cannot use the database postgresql"),
    ("DARTS_SQL_URL", "nosuchdb://host/db", "SQLAlchemy knows no database 'nosuchdb'"),
    ("DARTS_SQL_URL", "not a url", "is not a database URL"),
])
def test_a_database_that_cannot_be_used_is_one_line_before_the_run_and_print_config_still_works(
        tmp_path: Path, variable: str, url: str, words: str) -> None:
    result = run_experiment("paper_toy", "with", "steps=5", runs=tmp_path / "runs", env={variable: url})
    assert result.returncode != 0 and words in result.stderr, result.stderr
    assert f"{variable}: " in result.stderr and "Traceback" not in result.stderr
    assert not any(p.name.isdigit() for p in (tmp_path / "runs").iterdir())
    shown = run_experiment("paper_toy", "print_config", runs=tmp_path / "runs", env={variable: url})
    assert shown.returncode == 0, shown.stderr


@pytest.mark.parametrize("flag, url, module, extra", [
    ("-m", "mongodb://host:27017", "pymongo", "mongo"), ("-s", "postgresql://host/db", "sqlalchemy", "sql"),
    ("-s", "postgresql://host/db", "psycopg", "sql")])
def test_a_missing_driver_names_the_extra_to_install(monkeypatch, flag: str, url: str, module: str,
                                                     extra: str) -> None:
    import experiments.tracking

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    if module == "sqlalchemy":
        monkeypatch.delitem(sys.modules, "experiments.tracking.sql", raising=False)
        monkeypatch.delattr(experiments.tracking, "sql", raising=False)
    expected = rf"{flag} {url}: .* needs (the driver )?{module}: pip install 'darts-toolkit\[{extra}\]'"
    with pytest.raises(ConfigError, match=expected):
        observers.database_observer(url, f"{flag} {url}")


def test_the_url_forms_users_type_are_understood() -> None:
    sql = observers.sql_module("test")
    assert sql.engine_url("postgres://u:secret@h:5432/db").drivername == "postgresql+psycopg"
    assert sql.engine_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert sql.engine_url("sqlite:///x.db").drivername == "sqlite"
    assert database.split_url("mongodb://h:1/db#3, 7") == ("mongodb://h:1/db", ["3", "7"])
    assert database.split_url("sqlite:///x.db") == ("sqlite:///x.db", None)
    from experiments.report import shown_url
    assert shown_url("postgresql://u:secret@h/db") == "postgresql://h/db"


def test_a_mongo_address_without_a_scheme_is_understood_from_the_variable_and_the_flag(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(mongo, "mongo_observer", lambda url, source: seen.append((url, source)))
    observers.database_observer("h:27017:db", "DARTS_MONGO_URL")
    observers.database_observer("h:27017:db", "-m h:27017:db")
    assert seen == [("h:27017:db", "DARTS_MONGO_URL"), ("h:27017:db", "-m h:27017:db")]
    with pytest.raises(ConfigError, match="DARTS_SQL_URL: 'h:27017:db' is not a database URL"):
        observers.database_observer("h:27017:db", "DARTS_SQL_URL")


def test_reading_a_database_writes_nothing_and_one_without_runs_is_one_line(tmp_path: Path) -> None:
    typo = tmp_path / "tema.db"
    with pytest.raises(ConfigError, match=f"no SQLite database at {typo}: check the path"):
        database.read_database(f"sqlite:///{typo}")
    assert not typo.exists()  # reading never creates the file
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(ConfigError, match="holds no runs \\(no 'run' table\\): check the URL"):
        database.read_database(f"sqlite:///{other}")
    assert table_rows(f"sqlite:///{other}", "select name from sqlite_master") == []  # no tables made


@pytest.fixture
def in_process_mongo(monkeypatch, tmp_path: Path):
    """A MongoDB in this process (mongomock) that every run of this test records into."""
    mongomock = pytest.importorskip("mongomock")
    pytest.importorskip("mongomock.gridfs").enable_gridfs_integration()
    client = mongomock.MongoClient()
    monkeypatch.setattr(observers, "environment_observers", lambda: [mongo.observer_on(client, "darts")])
    monkeypatch.setenv("DARTS_RUNS_DIR", str(tmp_path / "runs"))
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    yield client
    torch.set_num_threads(threads)
    torch.set_rng_state(state)


def test_a_search_recorded_in_mongodb_keeps_one_copy_of_each_artifact_and_reports_like_its_folder(
        tmp_path: Path, in_process_mongo) -> None:
    from experiments import rnn_search

    write_corpus(tmp_path / "corpus")
    updates = dict(item.split("=", 1) for item in TINY["rnn"])
    updates = {key: None if value == "None" else int(value) for key, value in updates.items()}
    run = rnn_search.ex.run(named_configs=["smoke"], config_updates={**updates, "epochs": 2,
                                                                     "data_dir": str(tmp_path / "corpus")})
    db = in_process_mongo["darts"]
    [doc] = db["runs"].find()
    assert doc["_id"] == run._id == 1 and doc["status"] == "COMPLETED" and doc["result"] == run.result
    names = [a["name"] for a in doc["artifacts"]]
    assert sorted(names) == sorted(set(names)) and "checkpoint.pt" in names
    assert db["fs.files"].count_documents({}) == len(names) + len(doc["experiment"]["sources"])  # no stale copy
    metrics = {m["name"]: m["values"] for m in db["metrics"].find({"run_id": 1})}
    assert len(metrics["valid_ppl"]) == 2
    exported = database.write_folder(mongo.read_runs(in_process_mongo, "darts")[0], tmp_path / "exported")
    assert report_without_header(str(exported), tmp_path / "a") == report_without_header(
        str(tmp_path / "runs" / "1"), tmp_path / "b")


@pytest.mark.skipif(shutil.which("mongod") is None, reason="no mongod on PATH")
def test_a_real_mongod_records_a_run(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "db").mkdir()
    server = subprocess.Popen(["mongod", "--dbpath", str(tmp_path / "db"), "--port", str(port), "--bind_ip",
                               "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        url = f"mongodb://127.0.0.1:{port}/darts"
        result = run_experiment("paper_toy", "with", "steps=5", runs=tmp_path / "runs", env={"DARTS_MONGO_URL": url})
        assert result.returncode == 0, result.stderr
        assert report_main([f"{url}#1", "--out", str(tmp_path / "report")]) == 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_captured_output_keeps_every_epoch_line_and_the_result_and_no_progress_bar(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    result = run_experiment("rnn_search", "with", "smoke", f"data_dir={tmp_path / 'corpus'}", *TINY["rnn"], "epochs=3",
                            runs=tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    cout = (result.run_dir() / "cout.txt").read_text()
    assert [line.split(" - ")[-1].split(":")[0] for line in cout.splitlines() if " epoch " in line] == [
        "epoch 1", "epoch 2", "epoch 3"]
    assert f"Result: {result.run_json()['result']}" in cout and "Completed after" in cout
    assert "it/s" not in cout and "\r" not in cout


def test_sigterm_ends_a_run_as_interrupted_with_the_resume_command_and_the_resume_finishes_it(
        tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    args = ("with", "smoke", f"data_dir={tmp_path / 'corpus'}", *TINY["rnn"])
    process = subprocess.Popen([sys.executable, "-m", "experiments.rnn_search", *args, "epochs=200"],
                               cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "DARTS_RUNS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"})
    info = tmp_path / "runs" / "1" / "info.json"

    def epochs_done() -> int:
        try:  # the heartbeat rewrites info.json in place: a read may catch it half written
            return json.loads(info.read_text()).get("epochs_done", 0)
        except (OSError, ValueError):
            return 0

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and epochs_done() < 1:
        time.sleep(0.5)
    assert epochs_done() >= 1, "the run finished no epoch within 300 s"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert "Terminated: stopped by SIGTERM after epoch" in last and "Traceback" not in stderr
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    interrupted = json.loads(info.read_text())["interrupted"]
    assert run["status"] == "INTERRUPTED" and interrupted["by"] == "SIGTERM"
    assert interrupted["resume"] == f"resume={tmp_path / 'runs' / '1'}" and interrupted["resume"] in last
    done = interrupted["after_epoch"]
    resumed = run_experiment("rnn_search", *args, f"epochs={done + 1}", interrupted["resume"], runs=tmp_path / "runs")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.metrics(2)["valid_ppl"]["steps"] == list(range(1, done + 2))


def test_tensorboard_event_files_hold_every_metric_of_the_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_corpus(tmp_path / "corpus")
    result = run_experiment("rnn_search", "with", "smoke", f"data_dir={tmp_path / 'corpus'}", *TINY["rnn"], "epochs=2",
                            "tensorboard=True", runs=tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(result.run_dir() / "tensorboard"))
    events.Reload()
    metrics = result.metrics()
    assert set(events.Tags()["scalars"]) == set(metrics)
    for name, series in metrics.items():
        logged = events.Scalars(name)
        assert [e.step for e in logged] == series["steps"], name
        assert [e.value for e in logged] == pytest.approx(series["values"], rel=1e-6), name


def test_tensorboard_without_its_package_is_one_line_before_the_run(monkeypatch) -> None:
    from experiments.tracking import config

    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"tensorboard=True needs the tensorboard package: pip install "
                                          r"'darts-toolkit\[tensorboard\]'"):
        config.RunConfig(seed=0, epochs=1, device="cpu", threads=0, resume=None, time_limit=None, data_dir=None,
                         tensorboard=True, sync_batch_norm=False)
