"""`python -m experiments.<name> ARGS` without paying the interpreter start each time: a server process imports
torch, Sacred and every experiment once, then forks one child per run. The child is a fresh process as a user's would
be (its own environment, working folder, argv, stdout and stderr files, signal handlers, torch threads) that runs the
module as `__main__` through runpy, exactly what `python -m` does after its imports."""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

PRELOAD = ("torch", "torch._dynamo", "numpy", "sacred", "datasets", "tokenizers", "huggingface_hub",
           "experiments.rnn_search", "experiments.cnn_search", "experiments.rnn_train", "experiments.cnn_train",
           "experiments.paper_toy", "experiments.activation_toy", "experiments.report", "experiments.reproduce",
           "experiments.tracking.sql", "experiments.tracking.mongo", "pymongo", "gridfs",
           "matplotlib.backends.backend_agg")  # torch.optim's first optimizer imports torch._dynamo (~1.5 s)
PACKAGES = ("experiments.report", "experiments.tracking")  # kept loaded: `python -m` runs their __main__ only


class ForkServer:
    """The client side: `run` sends one request and waits for the child's exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        command = [sys.executable, "-c", "import tests.forkserver as f; f.serve()"]
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def run(self, module: str, args: list[str], env: dict[str, str], cwd: Path, out: Path, err: Path,
            timeout: float) -> int:
        """Run `module` with `args`; its output goes to the files `out` and `err`. Raises TimeoutError after killing
        the child when it runs past `timeout` seconds."""
        request = {"module": module, "args": args, "env": env, "cwd": str(cwd), "out": str(out), "err": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        pid = int(self._reply(30))
        try:
            return int(self._reply(timeout))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(30)
            raise

    def _reply(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the fork server within {timeout} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (exit status {self.process.wait()})")
        return line

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def serve() -> None:
    """The server: import once, then for each request line fork a child, answer its pid, then its exit status."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an extra not installed: its tests skip or expect the one-line error
            pass
    for name in [n for n in sys.modules if n.startswith("experiments.") and n.count(".") == 1 and n not in PACKAGES]:
        del sys.modules[name]  # a run executes its module afresh as __main__ (runpy warns when it is loaded already)
    gc.freeze()  # the children's collections then skip (and so do not copy) the server's objects
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


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
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
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
