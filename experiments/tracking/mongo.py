"""Runs in MongoDB (the `[mongo]` extra: pymongo): Sacred's MongoObserver with ids shared with the run folder and
one copy of each artifact, and the reading side for `experiments.report` and `experiments.reproduce`."""
from __future__ import annotations

import os
import re
from typing import Any

from sacred.observers import MongoObserver
from sacred.observers.mongo import get_pattern, parse_mongo_db_arg

from experiments.tracking.database import StoredRun, iso, shown_url
from shared.errors import ConfigError

SERVER_TIMEOUT_MS = 5000  # how long a start waits for an unreachable server before saying so
INSTALL = "pip install 'darts-toolkit[mongo]'"


class MongoRuns(MongoObserver):
    """Sacred's MongoObserver that tells the run folder which ids it holds and replaces an artifact added again."""

    name = "MongoDB"

    def max_run_id(self) -> int:
        return max((doc["_id"] for doc in self.runs.find({}, {"_id": 1}) if isinstance(doc["_id"], int)), default=0)

    def has_run(self, run_id: Any) -> bool:
        return self.runs.count_documents({"_id": {"$in": [run_id, str(run_id)]}}, limit=1) > 0

    def artifact_event(self, name: str, filename: str, metadata: Any = None, content_type: Any = None) -> None:
        for old in [a for a in self.run_entry["artifacts"] if a["name"] == name]:
            self.fs.delete(old["file_id"])
            self.run_entry["artifacts"].remove(old)
        # A content type given keeps Sacred from printing its guess into the captured output.
        super().artifact_event(name, filename, metadata, content_type or "application/octet-stream")


def connect(url: str, source: str) -> tuple[Any, str, str]:
    """(client, database name, where) for a MongoDB URL (mongodb://host:27017[/db]) or Sacred's host:port:db; the
    database is the URL's, else env DARTS_MONGO_DB, else `darts`. The server is reached once: an unreachable one,
    a malformed URL or a missing pymongo is one ConfigError."""
    try:
        import pymongo
        from pymongo.errors import PyMongoError
    except ImportError:
        raise ConfigError(f"{source}: recording in MongoDB needs pymongo: {INSTALL}") from None
    database = os.environ.get("DARTS_MONGO_DB") or "darts"
    try:
        if "://" in url:
            database = pymongo.uri_parser.parse_uri(url).get("database") or database
            address = url
        else:
            if re.match(get_pattern(), url) is None:
                raise ValueError("expected mongodb://host:27017[/db] or host:port:db")
            sacred_form = parse_mongo_db_arg(url)
            address, database = sacred_form.get("url", "localhost:27017"), sacred_form.get("db_name", database)
        client = pymongo.MongoClient(address, serverSelectionTimeoutMS=SERVER_TIMEOUT_MS)
    except (PyMongoError, ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {shown_url(url)!r} is not a MongoDB URL ({error})") from None
    where = f"{shown_url(url)} (database {database})"
    try:
        client.admin.command("ping")
    except PyMongoError as error:
        first = str(error).split(",")[0].split("\n")[0]
        raise ConfigError(f"{source}: cannot reach MongoDB at {where} ({first}): start the server or fix the "
                          f"URL") from None
    return client, database, where


def mongo_observer(url: str, source: str) -> MongoRuns:
    client, database, where = connect(url, source)
    return observer_on(client, database, where)


def observer_on(client: Any, database: str, where: str = "MongoDB") -> MongoRuns:
    """A MongoRuns observer on a connected client (a real or an in-process one)."""
    import gridfs

    db = client[database]
    observer = MongoRuns.create_from(db["runs"], gridfs.GridFS(db), metrics_collection=db["metrics"])
    observer.name = where
    return observer


def read_runs(client: Any, database: str, ids: list[str] | None = None) -> list[StoredRun]:
    """The runs of a MongoDB database (or those of `ids`) with their metrics, artifacts and sources."""
    import gridfs

    db = client[database]
    fs = gridfs.GridFS(db)
    query = {} if ids is None else {"_id": {"$in": [int(i) if str(i).isdigit() else i for i in ids] + list(ids)}}
    stored = []
    for doc in db["runs"].find(query).sort("_id", 1):
        run_id = doc["_id"]
        experiment = dict(doc.get("experiment", {}))
        sources = {str(name): fs.get(file_id).read() for name, file_id in experiment.get("sources", [])}
        metrics = {m["name"]: {"steps": m["steps"], "values": m["values"],
                               "timestamps": [iso(t) for t in m.get("timestamps", [])]}
                   for m in db["metrics"].find({"run_id": run_id})}
        artifacts = {a["name"]: fs.get(a["file_id"]).read() for a in doc.get("artifacts", [])}
        entry = {key: iso(value) for key, value in doc.items()
                 if key not in ("_id", "config", "info", "captured_out", "format")}
        entry["experiment"] = experiment
        stored.append(StoredRun(str(run_id), entry, doc.get("config", {}), doc.get("info", {}), metrics,
                                artifacts, sources, doc.get("captured_out") or ""))
    return stored
