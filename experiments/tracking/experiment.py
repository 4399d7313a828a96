"""An experiment with the house observers, captured-output filter and a record of every source file it can run."""
from __future__ import annotations

import contextlib
import logging
import numbers
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from sacred import Experiment
from sacred.dependencies import Source, get_dependencies_from_sys_modules
from sacred.utils import apply_backspaces_and_linefeeds

from experiments.tracking.config import check_config, run_values, scope_keys
from experiments.tracking.errors import RunError, Terminated, user_errors, which_process
from experiments.tracking.observers import add_observers
from shared.device import resolve_device
from shared import distributed
from shared.errors import ConfigError, UserFacingError


# Every run records all .py files of the packages an experiment's code can come from (experiments -> rnn_darts,
# cnn_darts -> shared; tests and benchmarks are never imported by a run), relative to the repository root, so that
# `experiments.reproduce` can tell which files changed since.
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = ("shared", "rnn_darts", "cnn_darts", "experiments")


def package_sources(root: Path = REPO_ROOT) -> list[Path]:
    """The .py files of SOURCE_PACKAGES under `root`, sorted."""
    return sorted(path for package in SOURCE_PACKAGES for path in (root / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def record_sources(ex: Experiment, module_globals: dict[str, Any]) -> None:
    """Point the run record at the experiment's own module instead of this one.

    Sacred reads the main file, the sources and the package dependencies from the globals of the module that calls
    `Experiment(...)`, which is this one: it would record only this package's files. Here the main
    file is the experiment's module, the sources are every file of our packages, and the dependencies are the
    versions of all packages imported so far (torch included: the experiment's module imports it indirectly).
    """
    mainfile = module_globals.get("__file__")
    if mainfile is None:  # an interactive session: keep what Sacred found
        return
    ex.mainfile = Source.create(mainfile, save_git_info=False)
    ex.sources = {ex.mainfile} | {Source.create(str(path), save_git_info=False) for path in package_sources()}
    ex.dependencies |= get_dependencies_from_sys_modules(module_globals, str(REPO_ROOT))
    ex.doc = module_globals.get("__doc__") or ex.doc  # `--help` shows the experiment's usage


def make_experiment(name: str, module_globals: dict[str, Any]) -> Experiment:
    """An experiment with the house observers; captured output keeps only the last state of progress bars.

    Call it as `make_experiment(name, globals())` after the experiment module's imports and its `CONFIGS` (the
    dataclasses the config fills) and `RENAMED` (their fields named otherwise in the config): the run records that
    module as its main file, every source file of our packages (relative to the repository root) and the versions
    of the imported packages, and the config is validated against `CONFIGS` before a run starts.
    """
    ex = Experiment(name, base_dir=str(REPO_ROOT), save_git_info=False)  # Sacred's git probe crashes without commits
    quiet_other_processes()
    record_sources(ex, module_globals)
    ex.pre_run_hook(record_git)
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    add_validation(ex, tuple(module_globals.get("CONFIGS", ())), module_globals.get("RENAMED", {}),
                   add_observers(ex))
    return ex


def quiet_other_processes() -> None:
    """In a distributed run every process but process 0 logs warnings and errors only (naming its rank), and not
    that it has no observers (process 0 records for all)."""
    try:
        processes = distributed.launched()
    except UserFacingError:  # garbled torchrun variables: the run's config check says so in one line
        return
    if processes.main or logging.getLogger().handlers:
        return
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s - rank {processes.rank} - %(name)s - "
                                                      f"%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "No observers have been added" not in record.getMessage())


def experiment_main(ex: Experiment, headline: str | None) -> Callable[[Callable[..., Any]], Any]:
    """Register `body(run, config, log)` as the experiment's main command: `config` is the run's config as
    `run_values` gives it, and a UserFacingError from the library ends the run as one line (`user_errors`).

    `body` returns the run's result as a dict: it goes to run info `result`, and the run's result (Sacred's
    `result`, which a SQL database keeps as a number) is its `headline` value, or None without one.
    """
    def register(body: Callable[[Any, dict[str, Any], Any], Any]) -> Any:
        def main(_run: Any, _config: dict[str, Any], _log: Any) -> Any:  # the names Sacred fills in
            keep_last_output(_run)
            with interruptions_recorded(_run):
                details = body(_run, run_values(_config), _log)
            distributed.stop()  # the group a distributed run joined (`run_tracked`); after a failure, exit alone:
            # leaving a group whose other processes are gone may hang
            _run.info["result"] = details
            value = details.get(headline) if headline is not None else None
            return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None

        main.__doc__ = body.__doc__
        return ex.main(user_errors(main))

    return register


def run_commandline(ex: Experiment) -> None:
    """`ex.run_commandline()`, with a SIGTERM's stop printed as one line (exit status 1)."""
    try:
        ex.run_commandline()
    except Terminated as stop:
        print(f"{type(stop).__name__}: {stop}", file=sys.stderr)
        sys.exit(1)


def keep_last_output(run: Any) -> None:
    """Sacred reads a run's captured output for the last time while its `tee` may not yet have written the last lines
    (the result, "Completed after", an interruption's): the rest, read when the capture closes, is added before the
    run's final events (completed, interrupted, failed) send it to the observers."""
    stop_heartbeat, read = run._stop_heartbeat, run._get_captured_output  # the first: after the capture closed
    lock = threading.Lock()  # a heartbeat reading at that moment must not write back its older text

    def read_locked() -> None:
        with lock:
            read()

    def add_rest_then_stop() -> None:
        with lock:
            output = run._output_file
            rest = getattr(output, "final", None)
            if rest:
                output.final = None  # read once
                text = (run.captured_out or "") + rest
                run.captured_out = run.captured_out_filter(text) if run.captured_out_filter else text
        stop_heartbeat()

    run._get_captured_output, run._stop_heartbeat = read_locked, add_rest_then_stop


@contextlib.contextmanager
def interruptions_recorded(run: Any) -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does, recorded as INTERRUPTED (not left RUNNING), and so does, in a distributed
    run, the loss of another process (a collective fails: torchrun then stops this one with SIGTERM, which it
    ignores from then on to finish its records); run info `interrupted` says which, after which epoch, and how to
    resume from the run folder's last checkpoint."""
    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("stopped by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield
    except RuntimeError as error:
        if not distributed.lost_peer(error):
            raise
        if previous is not None:
            previous = signal.SIG_IGN
        reason = re.sub(r"^\[[^]]*\]\s*", "", str(error).strip()).split(". ")[0][:200]  # gloo: "[file:line] ..."
        raise interrupted(run, "another process", "another process of this run stopped",
                          f"{reason}; torchrun's summary names its rank") from None
    except (Terminated, KeyboardInterrupt) as stop:
        if not isinstance(stop, Terminated):
            interrupted(run, "Ctrl-C", "")
            raise
        if previous is not None and which_process():
            previous = signal.SIG_IGN
        why = "torchrun stops every process when one fails: its summary names the rank" if which_process() else ""
        raise interrupted(run, "SIGTERM", "stopped by SIGTERM", why) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupted(run: Any, by: str, what: str, detail: str = "") -> Terminated:
    """Record in run info `interrupted` who stopped the run, after which epoch and the resume that continues it;
    returns the one-line stop to raise ('<what> after epoch N (<detail>): resume with resume=<folder>')."""
    done, checkpoint = run.info.get("epochs_done", 0), run.info.get("checkpoint")  # the recorder's
    resume = f"resume={Path(checkpoint).parent}" if checkpoint else None
    run.info["interrupted"] = {"by": by, "after_epoch": done, "resume": resume}
    where = f"resume with {resume}" if resume else "no epoch had finished: start it again"
    return Terminated(f"{which_process()}{what} after epoch {done}{f' ({detail})' if detail else ''}: {where}")


def add_validation(ex: Experiment, configs: tuple[Any, ...], renamed: dict[str, str],
                   attach_observers: Callable[[dict[str, Any]], None]) -> None:
    """Check the whole config (`check_config`) once Sacred has built it, before any run starts, then give a run its
    observers (`attach_observers`): a bad value, an unwritable runs folder or an unusable database fails as one line
    and leaves no run folder behind."""
    known: set[str] = set()

    def validate(config: dict[str, Any], command_name: str, logger: Any) -> dict[str, Any]:
        known.update(known or scope_keys(ex))
        try:
            check_config(config, known, configs, renamed)
            if command_name == ex.default_command:  # a run, not print_config and the like
                if "device" in config:
                    resolve_device(config["device"])  # an unknown or absent device
                attach_observers(config)
        except ConfigError as error:
            raise RunError(str(error)) from None
        return {}  # Sacred lets the command line's values win over a hook's: run_values converts paths

    ex.config_hook(validate)


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes; empty outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def record_git(_run: Any) -> None:
    _run.info["git"] = git_state()
