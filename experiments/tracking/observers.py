"""Where a run is recorded: its folder under runs/ and, for a team, a database (MongoDB, or SQL through SQLAlchemy).

Every run has a folder `runs/<id>` (env DARTS_RUNS_DIR or `-F DIR` moves runs/). Databases come from env
DARTS_MONGO_URL / DARTS_SQL_URL or the flags `-m URL` / `-s URL`, each URL in the form users type
(`mongodb://host:27017[/db]`, `postgresql://user@host/db`, `sqlite:///runs.db`; `-m` also takes Sacred's
`host:port:db`). The folder observer comes first and picks one id for the run in every observer: the next number
free under runs/ and in every database attached. Each observer keeps one copy of an artifact by name (the latest),
so the per-epoch genotype and checkpoint replace their last version instead of piling up.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from sacred.observers import FileStorageObserver, RunObserver

from experiments.tracking.database import shown_url
from shared.distributed import launched
from shared.errors import ConfigError

RUN_ID_PRIORITY = 10_000  # above every database observer: the folder observer starts first and picks the id
DATABASE_VARIABLES = ("DARTS_MONGO_URL", "DARTS_SQL_URL")
MONGO_SCHEMES = ("mongodb", "mongodb+srv")


def runs_dir() -> Path:
    return Path(os.environ.get("DARTS_RUNS_DIR", "runs"))


class RunFolderObserver(FileStorageObserver):
    """The run folder `runs/<id>`; its id is the run's id in every observer (`databases` are asked which ids they
    hold). An artifact added again replaces its file and is listed once in run.json."""

    def __init__(self, basedir: str | Path) -> None:
        super().__init__(str(basedir), priority=RUN_ID_PRIORITY)
        self.databases: list[Any] = []
        self.requested_id: int | str | None = None  # `-i ID`, checked by `request_id` before the run starts

    def taken(self, run_id: Any) -> str | None:
        """Where the id is already used ('runs/3', 'the database at URL'), or None."""
        if (Path(self.basedir) / str(run_id)).exists():
            return str(Path(self.basedir) / str(run_id))
        return next((f"the database {db.name}" for db in self.databases if db.has_run(run_id)), None)

    def _make_run_dir(self, _id: Any) -> None:
        os.makedirs(self.basedir, exist_ok=True)
        _id = self.requested_id if _id is None else _id
        if _id is not None:
            self._make_dir(_id)
            return
        candidate = max([self._maximum_existing_run_id()] + [db.max_run_id() for db in self.databases]) + 1
        while True:
            if not any(db.has_run(candidate) for db in self.databases):
                try:
                    self._make_dir(candidate)
                    return
                except FileExistsError:  # another process on this machine took it
                    pass
            candidate += 1

    def started_event(self, ex_info: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        super().started_event(dict(ex_info), *args, **kwargs)  # a copy: Sacred's writes its stored paths into it
        run_id = os.path.basename(self.dir)
        return int(run_id) if run_id.isdigit() else run_id

    def artifact_event(self, name: str, filename: str, metadata: Any = None, content_type: Any = None) -> None:
        self.save_file(filename, name)  # a file already in the run folder stays where it is
        if name not in self.run_entry["artifacts"]:
            self.run_entry["artifacts"].append(name)
            self.save_json(self.run_entry, "run.json")


def database_observer(url: str, source: str) -> Any:
    """A MongoDB or SQL observer for `url`, connected and checked; a missing driver, a malformed URL or an
    unreachable server is one ConfigError naming `source` (the variable or flag the URL came from)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in MONGO_SCHEMES or (not scheme and source.split()[0] in ("-m", "DARTS_MONGO_URL")):  # host:port:db
        from experiments.tracking.mongo import mongo_observer

        return mongo_observer(url, source)
    if scheme:
        return sql_module(source).sql_observer(url, source)
    raise ConfigError(f"{source}: {url!r} is not a database URL: give mongodb://host:27017[/db], "
                      f"postgresql://user@host/db or sqlite:///path.db")


def sql_module(source: str) -> Any:
    """experiments.tracking.sql, or one ConfigError when SQLAlchemy is not installed."""
    try:
        from experiments.tracking import sql
    except ImportError as error:
        raise ConfigError(f"{source}: recording in a SQL database needs {error.name}: pip install "
                          f"'darts-toolkit[sql]'") from None
    return sql


def environment_observers() -> list[Any]:
    """The database observers env DARTS_MONGO_URL and DARTS_SQL_URL ask for (empty or unset: none)."""
    return [database_observer(os.environ[name].strip(), name) for name in DATABASE_VARIABLES
            if os.environ.get(name, "").strip()]


def check_runs_folder(folder: Path, fix: str) -> None:
    """One line unless the runs folder can be created and written (before a run starts, not after its work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"runs folder {folder} is not writable ({error.strerror or error}): {fix}") from None


class TensorBoardObserver(RunObserver):
    """Every metric the run logs, also as TensorBoard event files in its folder's tensorboard/ (config key
    `tensorboard`); after the run folder's observer, whose folder it writes into."""

    priority = 0

    def __init__(self, folder: RunFolderObserver) -> None:
        self.folder, self.writer = folder, None

    def started_event(self, *args: Any, **kwargs: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(self.folder.dir) / "tensorboard"))

    def log_metrics(self, metrics_by_name: dict[str, Any], info: dict[str, Any]) -> None:
        for name, series in metrics_by_name.items():
            for step, value in zip(series["steps"], series["values"]):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def completed_event(self, *args: Any, **kwargs: Any) -> None:
        if self.writer is not None:  # None when an earlier observer's start failed
            self.writer.close()

    interrupted_event = failed_event = completed_event


HOUSE_OPTIONS = ("--file_storage", "--mongo_db", "--sql", "--id")  # taken from Sacred's hands by `add_observers`


def add_observers(ex: Any) -> Callable[[dict[str, Any]], None]:
    """Give every run of `ex` its observers; returns `attach`, which the config hook calls for a run (not for
    print_config and the like), so that a bad folder or database is one line before the run starts.

    Sacred's own -F, -m, -s and -i would add a second folder observer (two observers, one folder: FileExistsError),
    take only Sacred's `host:port:db` for MongoDB, and let a database pick an id the folder already holds. An option
    hook takes their values instead: `-F DIR` moves the run folder, `-m URL` / `-s URL` add databases beside
    DARTS_MONGO_URL / DARTS_SQL_URL, and `-i ID` asks for an id, refused in one line when it is taken.
    """
    given: dict[str, Any] = {}

    @ex.option_hook
    def take_options(options: dict[str, Any]) -> None:
        given.clear()
        given.update({flag: options.get(flag) for flag in HOUSE_OPTIONS})
        options.update(dict.fromkeys(HOUSE_OPTIONS))  # falsy: Sacred applies none of them

    def attach(config: dict[str, Any]) -> None:
        if not launched().main:  # a distributed run: process 0 records for all
            ex.observers[:] = []
            return
        where = given.get("--file_storage")
        folder_path = Path(where) if where else runs_dir()
        fix = "pass -F a folder this user can write" if where else "set DARTS_RUNS_DIR to a folder this user can write"
        check_runs_folder(folder_path, fix)
        folder = RunFolderObserver(folder_path)
        folder.databases = environment_observers() + [
            database_observer(given[flag], f"{short} {shown_url(given[flag])}")
            for flag, short in (("--mongo_db", "-m"), ("--sql", "-s")) if given.get(flag)]
        if given.get("--id"):
            folder.requested_id = request_id(folder, str(given["--id"]))
        ex.observers[:] = [folder, *folder.databases] + ([TensorBoardObserver(folder)] if config.get("tensorboard")
                                                         else [])

    return attach


def request_id(folder: RunFolderObserver, text: str) -> int | str:
    """The id `-i` asks for, unless a run folder or a database already holds it."""
    if re.fullmatch(r"(?!\.+$)[A-Za-z0-9_.-]{1,24}", text) is None:  # a folder name; the SQL key's 24 characters
        raise ConfigError(f"-i {text!r}: a run id is 1-24 letters, digits, '.', '_' or '-' (not only dots)")
    run_id = int(text) if text.isdigit() else text
    where = folder.taken(run_id)
    if where is not None:
        raise ConfigError(f"-i {text}: run id {text} is already used by {where}: choose another id or leave -i out")
    return run_id
