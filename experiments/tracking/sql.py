"""Runs in a SQL database through SQLAlchemy (the `[sql]` extra: SQLAlchemy, and psycopg for PostgreSQL).

Sacred's SqlObserver with three additions: a `metric` table holding every logged value per step (Sacred's stores
none), ids shared with the run folder, and one copy of each artifact. Sacred's tables cap names and paths at
16-64 characters, which PostgreSQL enforces (a long checkout path or package version would end a run): their text
columns are unbounded here. `read_runs` is the reading side for the report and `reproduce`.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy as sa

warnings.filterwarnings("ignore", message=r"The ``declarative_base\(\)`` function is now available")  # sacred's
from sacred.observers import SqlObserver  # noqa: E402 (after the filter: importing sql_bases warns)
from sacred.observers import sql_bases as tables  # noqa: E402
from sacred.serializer import flatten  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

from experiments.tracking.database import StoredRun, iso, shown_url  # noqa: E402
from shared.errors import ConfigError  # noqa: E402

CONNECT_TIMEOUT_S = 5
INSTALL = "pip install 'darts-toolkit[sql]'"


class Metric(tables.Base):
    """One logged value: run, metric name, step, value, time."""

    __tablename__ = "metric"
    metric_id = sa.Column(sa.Integer, primary_key=True)
    run_id = sa.Column(sa.String(24), sa.ForeignKey("run.run_id"), index=True)
    name = sa.Column(sa.Text)
    step = sa.Column(sa.Integer)
    value = sa.Column(sa.Float)
    timestamp = sa.Column(sa.DateTime)


def _widen_text_columns() -> None:
    """Sacred's bounded text columns (not keys, not the status enum) become unbounded before any table is made."""
    for table in tables.Base.metadata.tables.values():
        for column in table.columns:
            bounded = isinstance(column.type, sa.String) and not isinstance(column.type, sa.Enum)
            if bounded and column.type.length and not (column.primary_key or column.foreign_keys or column.unique):
                column.type = sa.Text()


_widen_text_columns()


class SqlRuns(SqlObserver):
    """Sacred's SqlObserver plus every metric per step, shared ids and artifacts replaced by name."""

    name = "SQL"

    def max_run_id(self) -> int:
        ids = [row[0] for row in self.session.query(tables.Run.run_id)]
        self.session.commit()
        return max((int(i) for i in ids if i.isdigit()), default=0)

    def has_run(self, run_id: Any) -> bool:
        found = self.session.query(tables.Run.run_id).filter_by(run_id=str(run_id)).first() is not None
        self.session.commit()
        return found

    def heartbeat_event(self, info: dict[str, Any], captured_out: str, beat_time: Any, result: Any) -> None:
        """Sacred calls this from its timer thread, whose scoped session does not hold the run's row (Sacred's own
        commit there saves nothing): one UPDATE through the engine instead."""
        values = {"info": json.dumps(flatten(info)), "captured_out": captured_out, "heartbeat": beat_time,
                  "result": result}
        with self.lock, self.engine.begin() as connection:
            connection.execute(sa.update(tables.Run).where(tables.Run.run_id == self.run_key).values(**values))

    def started_event(self, *args: Any, **kwargs: Any) -> Any:
        run_id = super().started_event(*args, **kwargs)
        self.run_key = str(run_id)
        return run_id

    def log_metrics(self, metrics_by_name: dict[str, Any], info: dict[str, Any]) -> None:
        with self.lock:
            with self.engine.begin() as connection:
                rows = [{"run_id": self.run_key, "name": name, "step": int(step), "value": float(value),
                         "timestamp": stamp}
                        for name, series in metrics_by_name.items()
                        for step, value, stamp in zip(series["steps"], series["values"], series["timestamps"])]
                if rows:
                    connection.execute(sa.insert(Metric), rows)

    def artifact_event(self, name: str, filename: str, metadata: Any = None, content_type: Any = None) -> None:
        old = next((a for a in self.run.artifacts if a.filename == name), None)
        if old is None:
            super().artifact_event(name, filename, metadata, content_type)
            return
        old.content = Path(filename).read_bytes()
        self.save()


def engine_url(url: str) -> sa.engine.URL:
    """The SQLAlchemy URL for what users type: postgres:// and postgresql:// use psycopg (3) unless psycopg2 is
    the one installed."""
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgres", "postgresql") and importlib.util.find_spec("psycopg2") is None:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str, source: str, create: bool = True) -> sa.engine.Engine:
    """A connected engine; with `create`, Sacred's tables and ours are made, else the database must already hold
    runs (reading never writes). ConfigError (one line) for a malformed URL, a missing driver, a database that cannot
    be reached or, when reading, one that holds no runs."""
    try:
        parsed = engine_url(url)
    except (sa.exc.ArgumentError, ValueError) as error:
        raise ConfigError(f"{source}: {shown_url(url)!r} is not a database URL ({error})") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if not create and backend == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        raise ConfigError(f"{source}: no SQLite database at {parsed.database}: check the path")
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend == "postgresql" else {}
    try:
        engine = sa.create_engine(parsed, connect_args=connect_args)
        if create:
            tables.Base.metadata.create_all(engine)
        elif not sa.inspect(engine).has_table(tables.Run.__tablename__):
            raise ConfigError(f"{source}: the database {shown} holds no runs (no {tables.Run.__tablename__!r} "
                              f"table): check the URL")
    except sa.exc.NoSuchModuleError:
        raise ConfigError(f"{source}: SQLAlchemy knows no database {parsed.drivername!r}: use postgresql://, "
                          f"sqlite:/// or another SQLAlchemy URL") from None
    except ImportError as error:
        raise ConfigError(f"{source}: {parsed.drivername} needs the driver {error.name}: {INSTALL}") from None
    except sa.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ConfigError(f"{source}: cannot use the database {shown} ({reason}): start the server or fix the "
                          f"URL") from None
    return engine


def sql_observer(url: str, source: str) -> SqlRuns:
    engine = make_engine(url, source)
    observer = SqlRuns.create_from(engine, scoped_session(sessionmaker(bind=engine)))
    observer.name = engine_url(url).render_as_string(hide_password=True)
    return observer


def read_runs(url: str, ids: list[str] | None = None) -> list[StoredRun]:
    """The runs of a SQL database (or those of `ids`) with their metrics, artifacts and sources; ConfigError (one
    line) when the database cannot be read as Sacred's tables."""
    engine = make_engine(url, shown_url(url), create=False)
    try:
        return _read(engine, ids)
    except sa.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ConfigError(f"{shown_url(url)}: cannot read runs from it ({reason}): is it a DARTS runs "
                          f"database?") from None


def _read(engine: sa.engine.Engine, ids: list[str] | None) -> list[StoredRun]:
    stored, metric_table = [], sa.inspect(engine).has_table(Metric.__tablename__)  # none in Sacred's own schema
    with sessionmaker(bind=engine)() as session:
        query = session.query(tables.Run).order_by(tables.Run.id)
        for run in query if ids is None else query.filter(tables.Run.run_id.in_(ids)):
            stored.append(StoredRun(run.run_id, _entry(run), json.loads(run.config or "{}"),
                                    json.loads(run.info or "{}"),
                                    _metrics(session, run.run_id) if metric_table else {},
                                    {a.filename: bytes(a.content) for a in run.artifacts},
                                    {s.filename: s.content.encode() for s in run.experiment.sources},
                                    run.captured_out or ""))
    return stored


def _entry(run: Any) -> dict[str, Any]:
    """What a run folder's run.json says, from the run's row."""
    experiment = run.experiment
    return {"experiment": {"name": experiment.name, "base_dir": experiment.base_dir,
                           "dependencies": sorted(d.to_json() for d in experiment.dependencies),
                           "repositories": [r.to_json() for r in experiment.repositories]},
            "command": run.command, "host": run.host.to_json(), "status": run.status, "result": run.result,
            "start_time": iso(run.start_time), "heartbeat": iso(run.heartbeat), "stop_time": iso(run.stop_time),
            "meta": {"comment": run.comment, "priority": run.priority}, "resources": [],
            **({"fail_trace": run.fail_trace.splitlines(keepends=True)} if run.fail_trace else {})}


def _metrics(session: Any, run_id: str) -> dict[str, dict[str, list[Any]]]:
    metrics: dict[str, dict[str, list[Any]]] = {}
    for row in session.query(Metric).filter_by(run_id=run_id).order_by(Metric.metric_id):
        series = metrics.setdefault(row.name, {"steps": [], "values": [], "timestamps": []})
        series["steps"].append(row.step)
        series["values"].append(row.value)
        series["timestamps"].append(iso(row.timestamp))
    return metrics
