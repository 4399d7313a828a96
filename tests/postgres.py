"""A PostgreSQL server of the tests' own: initdb and pg_ctl in a temporary folder, on a free local port, as an
unprivileged user (PostgreSQL refuses to run as root: under root the server runs as `nobody`)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT_S = 60


def server_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).resolve().parent)):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_user(uid: int | None, gid: int | None):
    if uid is None:
        return None

    def drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return drop


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway server and yield its URL (postgresql://darts@127.0.0.1:PORT/postgres); skip the test with
    the reason when the binaries are absent."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql (.ci/run does)")
    uid = gid = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    folder = Path(tempfile.mkdtemp(prefix="darts-postgres-"))  # not under pytest's tmp_path: root-only folders
    data, log = folder / "data", folder / "server.log"
    if uid is not None:
        os.chown(folder, uid, gid)
    port = _free_port()
    run = dict(preexec_fn=_as_user(uid, gid), capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=folder)
    try:
        for command in ([binaries / "initdb", "-D", data, "-U", "darts", "--auth=trust", "-E", "UTF8"],
                        [binaries / "pg_ctl", "-D", data, "-l", log, "-w", "-o",
                         f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]):
            started = subprocess.run([str(part) for part in command], **run)
            if started.returncode != 0:
                server_log = log.read_text() if log.exists() else ""
                pytest.fail(f"PostgreSQL did not start: {started.stderr or started.stdout} {server_log}")
        yield f"postgresql://darts@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       preexec_fn=_as_user(uid, gid), capture_output=True, timeout=START_TIMEOUT_S, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)
