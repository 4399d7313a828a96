"""What every experiment shares: observers, the one-line error treatment, artifact helpers.

This package is the only code that imports Sacred. Runs go to a FileStorageObserver under `runs/` (env
DARTS_RUNS_DIR moves it); with env DARTS_MONGO_URL set (e.g. mongodb://host:27017) a MongoObserver records them too
(database: env DARTS_MONGO_DB, default `darts`). Sacred's own `-F DIR` / `-m URL` flags add further observers.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised by sacred 0.8.7's import
from sacred import Experiment  # noqa: E402 - after the warnings filter
from sacred.observers import FileStorageObserver  # noqa: E402 - after the warnings filter
from sacred.utils import SacredError, apply_backspaces_and_linefeeds  # noqa: E402 - after the warnings filter

from shared.errors import UserFacingError  # noqa: E402 - after the warnings filter


class RunError(SacredError):
    """A problem with the user's input: printed as one line, and the run is recorded as FAILED."""

    def __init__(self, message: str) -> None:
        super().__init__(message, print_traceback=False)


def runs_dir() -> Path:
    return Path(os.environ.get("DARTS_RUNS_DIR", "runs"))


# Every run records all .py files of the packages an experiment's code can come from (experiments -> rnn_darts,
# cnn_darts -> shared; tests and benchmarks are never imported by a run), relative to the repository root, so that
# `experiments.reproduce` can tell which files changed since.
REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("shared", "rnn_darts", "cnn_darts", "experiments")


def package_sources(root: Path = REPO_ROOT) -> list[Path]:
    """The .py files of SOURCE_PACKAGES under `root`, sorted."""
    return sorted(path for package in SOURCE_PACKAGES for path in (root / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def _record_sources(ex: Experiment, module_globals: dict[str, Any]) -> None:
    """Point the run record at the experiment's own module instead of this one.

    Sacred reads the main file, the sources and the package dependencies from the globals of the module that calls
    `Experiment(...)`, which is this one: it recorded only experiments/__init__.py and _sacred.py. Here the main
    file is the experiment's module, the sources are every file of our packages, and the dependencies are the
    versions of all packages imported so far (torch included: the experiment's module imports it indirectly).
    """
    from sacred.dependencies import Source, get_dependencies_from_sys_modules

    mainfile = module_globals.get("__file__")
    if mainfile is None:  # an interactive session: keep what Sacred found
        return
    ex.mainfile = Source.create(mainfile, save_git_info=False)
    ex.sources = {ex.mainfile} | {Source.create(str(path), save_git_info=False) for path in package_sources()}
    ex.dependencies |= get_dependencies_from_sys_modules(module_globals, str(REPO_ROOT))
    ex.doc = module_globals.get("__doc__") or ex.doc  # `--help` shows the experiment's usage


def make_experiment(name: str) -> Experiment:
    """An experiment with the house observers; captured output keeps only the last state of progress bars.

    Call it at the end of the experiment module's imports: the run records that module as its main file, every
    source file of our packages (relative to the repository root) and the versions of the imported packages.
    """
    import inspect

    ex = Experiment(name, base_dir=str(REPO_ROOT), save_git_info=False)  # Sacred's git probe crashes without commits
    caller = inspect.currentframe().f_back  # the experiment's module (Sacred would take this one's globals)
    _record_sources(ex, caller.f_globals if caller is not None else {})
    ex.pre_run_hook(_record_git)
    ex.observers.append(FileStorageObserver(str(runs_dir())))
    mongo_url = os.environ.get("DARTS_MONGO_URL")
    if mongo_url:
        from sacred.observers import MongoObserver

        ex.observers.append(MongoObserver(url=mongo_url, db_name=os.environ.get("DARTS_MONGO_DB", "darts")))
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    return ex


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes; empty outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _record_git(_run: Any) -> None:
    _run.info["git"] = git_state()


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserFacingError raised by library code into a one-line RunError."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserFacingError as error:
            raise RunError(str(error)) from None

    return wrapper


def add_json_artifact(run: Any, name: str, data: Any) -> None:
    """Store `data` as a JSON artifact `name` of the run (written to a temp file first)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(json.dumps(data, indent=2))
        run.add_artifact(str(path), name=name)


def run_folder(run: Any) -> Path:
    """Where this run keeps its checkpoint: its FileStorageObserver folder, else a fresh temporary folder."""
    for observer in run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir)
    return Path(tempfile.mkdtemp(prefix=f"darts-run-{run._id}-"))


class SacredRecorder:
    """Sends the shared epoch loop's per-epoch records to a Sacred run (implements shared.loop.Recorder).

    Metrics go through `log_scalar` under stable names with the epoch as step. For a search (`search=True`) the
    genotype goes to run info (`genotype`, `genotype_history`) and to the artifacts `genotype.json` and
    `genotype_history.json`, and the softmax of the alphas of every epoch to `alphas.json`; a training's genotype is
    fixed and recorded once by its experiment. When an early stop ends a search, `genotype` and genotype.json are the
    genotype it chose and run info `early_stop` holds its decision. The checkpoint is the run folder's
    `checkpoint.pt` (and an artifact for observers that keep no folder, such as MongoDB).
    """

    def __init__(self, run: Any, folder: Path, search: bool = True) -> None:
        self.run, self.folder, self.search = run, folder, search

    def epoch(self, record: Any, history: list[Any]) -> None:
        for name, value in record.metrics.items():
            self.run.log_scalar(name, value, record.epoch)
        self.run.info["epochs_done"] = record.epoch
        if self.search:
            self._genotypes(record, history)

    def _genotypes(self, record: Any, history: list[Any]) -> None:
        from shared.genotypes import to_dict
        from shared.loop import chosen_genotype

        genotypes = [{"epoch": r.epoch, "genotype": to_dict(r.genotype)} for r in history]
        genotype = to_dict(chosen_genotype(history))
        self.run.info["genotype"] = genotype
        self.run.info["genotype_history"] = genotypes
        self.run.info["alphas"] = record.alphas
        if record.stop is not None:
            self.run.info["early_stop"] = record.stop.to_dict()
        else:  # a run resumed with early_stop=off after a stop continues past it
            self.run.info.pop("early_stop", None)
        add_json_artifact(self.run, "genotype.json", genotype)
        add_json_artifact(self.run, "genotype_history.json", genotypes)
        add_json_artifact(self.run, "alphas.json", [{"epoch": r.epoch, "alphas": r.alphas} for r in history])

    def checkpoint(self, path: Path, epoch: int) -> None:
        self.run.info["checkpoint"] = str(path)
        if path.parent != self.folder or any(not isinstance(o, FileStorageObserver) for o in self.run.observers):
            self.run.add_artifact(str(path), name="checkpoint.pt")


# Config scopes the experiments add to their own (`ex.config(...)`, after their own so that its comments win).
# Comments here become `print_config`'s; a docstring would print as the whole config's.
def common_config() -> None:  # the keys every search and training shares, with one meaning everywhere
    device = "auto"  # auto | cpu | cuda | cuda:N
    threads = 0  # torch CPU threads (0: torch's default)
    resume = None  # a run folder or checkpoint.pt to continue from in a new run (README: which keys may change)
    time_limit = None  # minutes (a batch job's limit): start no epoch the longest so far would carry past it; resume=


def paper() -> None:  # a named config: the paper's configuration is every experiment's default (tests check it)
    pass  # so `with paper` is a valid command line that changes nothing


def config_values(cls: Any, config: dict[str, Any], renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """The values of dataclass `cls`'s fields in a run's config; `renamed` maps a field to its config key where
    the two differ (e.g. ninp -> emsize). Fields the config does not hold (sizes read from the data) are the
    caller's to add."""
    renamed = renamed or {}
    keys = {name: renamed.get(name, name) for name in cls.__dataclass_fields__}
    return {name: config[key] for name, key in keys.items() if key in config}


def collapse_config() -> None:  # the collapse diagnostics and early stopping of every search (shared.collapse)
    hessian_every = 2  # the dominant eigenvalue of the alpha Hessian (RobustDARTS) every N epochs; 0: never
    hessian_iterations = 20  # cost cap: Hessian-vector products per measurement (Lanczos)
    hessian_tol = 1e-3  # stop a measurement once its relative residual is below this
    early_stop = "off"  # off | robust (eigenvalue growth, RobustDARTS) | skip (parameter-free op count, DARTS+)
    early_stop_factor = 1.3  # robust: stop when the eigenvalue's local average grew by more than this factor
    early_stop_start = 10  # robust: the epoch returned (the earlier window's middle) is at least this one
    early_stop_window = 5  # robust: measurements per local average
    early_stop_delta = 4  # robust: compare with the local average this many measurements earlier
    early_stop_skips = 2  # skip: stop once the cell holds this many skip_connect (CNN normal cell) / identity (RNN)


# Keys that may differ between a run and the run that resumes it (a search whose schedule spans `epochs` removes it).
# The collapse keys only measure and stop: they change nothing a finished epoch computed.
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "device", "data_dir", "threads", "time_limit",
                               *collapse_config.__code__.co_varnames})


def check_resume_config(saved: dict[str, Any], current: dict[str, Any],
                        may_change: frozenset[str] = RESUMABLE_CHANGES) -> None:
    """A resumed run must continue the same search: every other config value must match the checkpoint's."""
    from shared.errors import ConfigError

    keys = (set(saved) | set(current)) - may_change
    differ = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"resume: the config differs from the checkpoint's ({shown}); "
                          f"pass the original run's named configs and values along with resume=")


def run_tracked(run: Any, config: dict[str, Any], build_task: Callable[[], Any],
                may_change: frozenset[str] = RESUMABLE_CHANGES, genotype: Any = None, collapse: Any = None
                ) -> tuple[Any, list[Any]]:
    """What every search and training experiment does around its task: threads, seed, resume, checkpoint folder,
    the epoch loop, and the time limit (config `time_limit`, minutes from now: no epoch starts that would end after
    it, judged by the longest epoch so far; run info `stopped_early` says where it stopped). `genotype` is a
    training's fixed cell (None for a search): no genotype history is recorded, and a resume must train the
    checkpoint's cell, since `genotype_from` may now point at another one of the same shapes. `collapse` (a
    search's CollapseConfig) sets its early-stopping rule, which counts the task's `skip_metric`. Returns the task
    and the epoch records."""
    import torch

    from shared import checkpoint
    from shared.collapse import EarlyStop
    from shared.errors import CheckpointError, ConfigError
    from shared.genotypes import to_dict
    from shared.loop import run_epochs

    started = time.monotonic()  # the time limit counts data loading too
    limit = config.get("time_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
                              or not math.isfinite(limit)):
        raise ConfigError(f"time_limit must be a positive number of minutes or None, got {limit!r}")
    if isinstance(config["epochs"], bool) or not isinstance(config["epochs"], int) or config["epochs"] < 1:
        raise ConfigError(f"epochs must be a positive integer, got {config['epochs']!r}")
    threads = config.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ConfigError(f"threads must be 0 (torch's default) or a positive integer, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config["seed"])
    resume_state = checkpoint.load(config["resume"]) if config.get("resume") else None
    if resume_state is not None:
        check_resume_config(resume_state["config"], config, may_change)
        if genotype is not None and resume_state["genotype"] != to_dict(genotype):
            raise CheckpointError(f"resume: the checkpoint trained the cell {resume_state['genotype']}, but "
                                  f"genotype_from now gives {to_dict(genotype)}; resume with the genotype the run "
                                  f"started from")
        if resume_state["epoch"] >= config["epochs"]:
            more = f"; raise epochs above {resume_state['epoch']} to continue" if "epochs" in may_change else ""
            raise ConfigError(f"resume: the checkpoint has done {resume_state['epoch']} epochs and epochs="
                              f"{config['epochs']}: nothing is left to run{more}")
        stop = resume_state["history"][-1].get("early_stop") if resume_state["history"] else None
        if stop is not None and collapse is not None and collapse.early_stop != "off":
            raise ConfigError(f"resume: the search stopped early after epoch {stop['epoch']} ({stop['reason']}); "
                              f"nothing is left to run; pass early_stop=off to continue it")
        run.info["resumed_from"] = {"checkpoint": str(config["resume"]), "epoch": resume_state["epoch"]}
    folder = run_folder(run)
    task = build_task()
    stopper = None if collapse is None else EarlyStop(collapse, task.skip_metric)
    recorder = SacredRecorder(run, folder, genotype is None)
    deadline = None if limit is None else started + 60.0 * limit
    history = run_epochs(task, config["epochs"], folder / "checkpoint.pt", recorder, config, resume_state,
                         deadline=deadline, early_stop=stopper)
    if history and history[-1].epoch < config["epochs"] and history[-1].stop is None:
        run.info["stopped_early"] = {"after_epoch": history[-1].epoch, "of": config["epochs"],
                                     "resume": f"resume={folder}"}
    return task, history


def resolve_genotype(spec: str, space: str) -> tuple[Any, str]:
    """The genotype a training starts from and its source (`shared.genotypes.resolve`: a published name, a JSON
    file, a run folder). A run folder must hold a COMPLETED run, whose genotype.json is its final one; a file's
    source is its absolute path."""
    from shared.genotypes import GenotypeError, resolve

    folder = Path(str(spec))
    if folder.is_dir() and (folder / "run.json").is_file():
        try:
            status = json.loads((folder / "run.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            raise GenotypeError(f"{folder / 'run.json'} is unreadable: pass a genotype JSON file instead") from None
        if status != "COMPLETED":
            raise GenotypeError(f"{spec} is a {status} run: its genotype.json is that of its last finished epoch; "
                                f"pass genotype_from={folder / 'genotype.json'} to train that cell anyway")
    genotype, source = resolve(spec, space)
    return genotype, source if source.startswith("published ") else str(Path(source).resolve())


def record_training(run: Any, log: Any, config: dict[str, Any], build_task: Callable[[], Any], genotype: Any,
                    source: str, metric: str, best: Callable[[Any], Any],
                    may_change: frozenset[str] = RESUMABLE_CHANGES) -> dict[str, Any]:
    """What a from-scratch training experiment does around its task: record the genotype and where it came from
    (run info `genotype`, `genotype_source`, artifact `genotype.json`) and the parameter count (`num_parameters`),
    run the epochs (`run_tracked`), then test (metrics logged at the last epoch) and return the result. A run the
    time limit stopped is not tested: its resumed run will be."""
    from shared.genotypes import to_dict

    run.info.update(genotype=to_dict(genotype), genotype_source=source)
    add_json_artifact(run, "genotype.json", to_dict(genotype))

    def build() -> Any:
        task = build_task()
        run.info["num_parameters"] = task.num_parameters()
        log.info("genotype from %s; %s parameters", source, f"{task.num_parameters():,}")
        return task

    task, history = run_tracked(run, config, build, may_change, genotype)
    result = {"genotype_source": source, "num_parameters": run.info["num_parameters"],
              **headline(history, metric, best)}
    if history[-1].epoch < config["epochs"]:
        log.info("stopped after epoch %d of %d: no test; resume to finish", history[-1].epoch, config["epochs"])
        return result
    test = task.test()
    for name, value in test.items():
        run.log_scalar(name, value, history[-1].epoch)
    log.info("test: %s", ", ".join(f"{k} {v:.4g}" for k, v in test.items()))
    return {**result, **test}


def headline(history: list[Any], metric: str, best: Callable[[Any], Any]) -> dict[str, Any]:
    """The final and the best value of a run's headline metric."""
    return {metric: history[-1].metrics[metric], f"best_{metric}": best(r.metrics[metric] for r in history)}


def search_result(history: list[Any], metric: str, best: Callable[[Any], Any] = min) -> dict[str, Any]:
    """The run's result: its genotype (the final one, or the one an early stop chose), the final and the best value
    of its headline metric, and the early stop's decision if one ended the run."""
    from shared.genotypes import to_dict
    from shared.loop import chosen_genotype

    stop = history[-1].stop
    return {"genotype": to_dict(chosen_genotype(history)), **headline(history, metric, best),
            **({} if stop is None else {"early_stop": stop.to_dict()})}
