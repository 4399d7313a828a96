"""`python -m experiments.<name> ARGS` without paying the interpreter start each time: a server process imports
torch, Sacred and every experiment once, then forks one child per run. The child is a fresh process as a user's would
be (its own environment, working folder, argv, stdout and stderr files, signal handlers, torch threads) that runs the
module as `__main__` through runpy, exactly what `python -m` does after its imports.

What a child shares with the server, unlike a new interpreter: the hash seed (set iteration order), what was read
from the environment at import (PYTHON* variables, HF_HUB_OFFLINE, ...), warnings printed at import (to the
server's log), and the modules loaded (Sacred's dependency list names them). `run_experiment` starts a new
interpreter where that matters (tests/conftest.py)."""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

PRELOAD = ("torch", "torch._dynamo", "numpy", "sacred", "datasets", "tokenizers", "huggingface_hub",
           "experiments.rnn_search", "experiments.cnn_search", "experiments.rnn_train", "experiments.cnn_train",
           "experiments.paper_toy", "experiments.activation_toy", "experiments.report", "experiments.reproduce",
           "experiments.tracking.sql", "experiments.tracking.mongo", "pymongo", "gridfs",
           "matplotlib.backends.backend_agg")  # torch.optim's first optimizer imports torch._dynamo (~1.5 s)
PACKAGES = ("experiments.report", "experiments.tracking")  # kept loaded: `python -m` runs their __main__ only


class ForkServer:
    """The client side: `run` sends one request and reads the one line that answers it."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        command = [sys.executable, "-c", "import tests.forkserver as f; f.serve()"]
        with log.open("wb") as errors:  # the server's own failures (its children write to their own files)
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=errors)
        self.log, self.pending = log, b""

    def run(self, module: str, args: list[str], env: dict[str, str], cwd: Path, out: Path, err: Path,
            timeout: float) -> int:
        """Run `module` with `args`, its output in the files `out` and `err`; its exit status (negative: the signal
        that ended it). The server kills a child that runs past `timeout` seconds: TimeoutError then."""
        request = {"module": module, "args": args, "env": env, "cwd": str(cwd), "out": str(out), "err": str(err),
                   "timeout": timeout}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        answer = json.loads(self._line(timeout + 120))  # the server's imports (first call) and the kill
        if answer["timed_out"]:
            raise TimeoutError(f"killed after {timeout} s")
        return answer["status"]

    def _line(self, timeout: float) -> bytes:
        """The server's next line, read unbuffered (a buffered reader would hide a line from select)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.process.stdout.fileno(), 65536) if ready else None
            if chunk is None:
                raise RuntimeError(f"the fork server did not answer within {timeout:.0f} s (its log: {self.log})")
            if not chunk:
                raise RuntimeError(f"the fork server ended with status {self.process.wait()} (its log: {self.log})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def close(self) -> None:
        """End the server (and so its imports); a server that does not end in 30 s is killed."""
        try:
            self.process.stdin.close()
        except OSError:  # a server that already ended
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve() -> None:
    """The server: import once, then for each request line fork a child, wait for it (killing it at its timeout)
    and answer one line: its exit status and whether it was killed for time."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an extra not installed: its tests skip or expect the one-line error
            pass
    package = sys.modules["experiments"]
    for name in [n for n in sys.modules if n.startswith("experiments.") and n.count(".") == 1 and n not in PACKAGES]:
        del sys.modules[name]  # a run executes its module afresh as __main__ (runpy warns when it is loaded already)
        vars(package).pop(name.split(".")[1], None)
    gc.freeze()  # the children's collections then skip (and so do not copy) the server's objects
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline, timed_out = time.monotonic() + request["timeout"], False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if not timed_out and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still this child's
                timed_out = True
            time.sleep(0.02)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status), "timed_out": timed_out}), flush=True)


def _child(request: dict) -> NoReturn:
    """Become the run: its environment, folder, files and argv, then the module as `__main__`. The exit goes through
    the interpreter's own shutdown (atexit handlers, flushed files), as at the end of `python -m`."""
    import runpy
    import traceback

    import torch

    code: object = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], write), (2, request["err"], write)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        if "OMP_NUM_THREADS" in request["env"]:  # what a new interpreter's torch would take from it
            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        sys.argv = [f"-m experiments.{request['module']}", *request["args"]]  # runpy sets argv[0] to the file
        runpy.run_module(f"experiments.{request['module']}", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, exit status 1
        traceback.print_exc()
    raise SystemExit(code)
