"""What every search and training experiment does around its task: threads, seed, resume, the epoch loop, results."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from experiments.tracking.config import RESUMABLE_CHANGES, RunConfig, check_resume_config, config_values
from experiments.tracking.folders import read_json
from experiments.tracking.recorder import SacredRecorder, Unrecorded, add_json_artifact, run_folder
from shared import checkpoint, distributed
from shared.collapse import CollapseConfig, EarlyStop
from shared.controller import ControllerConfig
from shared.device import resolve_device
from shared.errors import CheckpointError, ConfigError
from shared.genotypes import GenotypeError, resolve, to_dict
from shared.loop import chosen_genotype, run_epochs


def run_tracked(run: Any, config: dict[str, Any], build_task: Callable[[], Any],
                may_change: frozenset[str] = RESUMABLE_CHANGES, genotype: Any = None, collapse: Any = None
                ) -> tuple[Any, list[Any]]:
    """What every search and training experiment does around its task: threads, the processes torchrun started
    (`shared.distributed`: process 0 alone reads the checkpoint to resume from and records), seed, resume (after a
    restart by torchrun, from the previous attempt: `elastic_resume`), checkpoint folder, the epoch loop, and the
    time limit (config `time_limit`, minutes from now: no epoch starts that would end after it, judged by the
    longest epoch so far; run info `stopped_early` says where it stopped). `genotype` is a
    training's fixed cell (None for a search): no genotype history is recorded, and a resume must train the
    checkpoint's cell, since `genotype_from` may now point at another one of the same shapes. `collapse` (a
    search's CollapseConfig) sets its early-stopping rule, which counts the task's `skip_metric`. Returns the task
    and the epoch records."""
    started = time.monotonic()  # the time limit counts data loading too
    settings = RunConfig(**config_values(RunConfig, config))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    processes = distributed.start(resolve_device(settings.device), settings.sync_batch_norm)  # experiment_main leaves
    torch.manual_seed(settings.seed)  # the same model on every process (process 0's is copied to all anyway)
    folder = Path(distributed.broadcast(str(run_folder(run)) if processes.main else None))  # process 0's: it writes
    resume = distributed.from_main(lambda: elastic_resume(folder)) or settings.resume
    resume_state = checked_resume(resume, run, config, may_change, genotype, collapse) if resume is not None else None
    task = build_task()
    seeds = [settings.seed + rank for rank in range(processes.world_size)]
    if processes.rank:  # its own dropout masks; process 0's stream goes on as a single process's would
        torch.manual_seed(seeds[processes.rank])
    if processes.several:
        run.info["distributed"] = {"world_size": processes.world_size, "backend": processes.backend,
                                   "seeds": seeds, "sync_batch_norm": processes.sync_batch_norm}
    stopper = None if collapse is None else EarlyStop(collapse, task.skip_metric)
    recorder = SacredRecorder(run, folder, genotype is None) if processes.main else Unrecorded(run)
    deadline = None if settings.time_limit is None else started + 60.0 * settings.time_limit
    history = run_epochs(task, config["epochs"], folder / "checkpoint.pt", recorder, config, resume_state,
                         deadline=deadline, early_stop=stopper)
    if history and history[-1].epoch < config["epochs"] and history[-1].stop is None:
        run.info["stopped_early"] = {"after_epoch": history[-1].epoch, "of": config["epochs"],
                                     "resume": f"resume={folder}"}
    return task, history


def checked_resume(resume: str, run: Any, config: dict[str, Any], may_change: frozenset[str], genotype: Any,
                   collapse: Any) -> dict[str, Any]:
    """The checkpoint `resume` names (process 0 reads it and sends it to the others), checked against the run: the
    same experiment, config (but for `may_change`) and cell, and something left to run."""
    resume_state = distributed.from_main(lambda: checkpoint.load(resume))
    checkpoint.check_kind(resume_state, resume, run.experiment_info["name"])
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
    run.info["resumed_from"] = {"checkpoint": str(resume), "epoch": resume_state["epoch"]}
    return resume_state


def elastic_resume(folder: Path) -> str | None:
    """The run folder to resume from when torchrun restarted its processes after a failure (`--max-restarts`): the
    folder of this torchrun job's previous attempt, which its process 0 named in the runs folder
    (`.torchrun-<TORCHELASTIC_RUN_ID>`, rewritten by every attempt); None on a first attempt, without torchrun, and
    for a job without its own id (--standalone draws one; else --rdzv_id names it)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if job in ("", "none") or not folder.parent.is_dir():  # "none": torchrun's default, shared by every job
        return None
    marker = folder.parent / f".torchrun-{job.replace('/', '_')}"
    try:
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip() not in ("", "0")
        previous = marker.read_text().strip() if restarted and marker.is_file() else None
        marker.write_text(str(folder))
    except OSError:  # a runs folder this process may not write: no restart resumes (docs/distributed.md)
        return None
    return previous if previous and (Path(previous) / "checkpoint.pt").is_file() else None


def resolve_genotype(spec: str, space: str) -> tuple[Any, str]:
    """The genotype a training starts from and its source (`shared.genotypes.resolve`: a published name, a JSON
    file, a run folder). A run folder must hold a COMPLETED run, whose genotype.json is its final one; a file's
    source is its absolute path."""
    folder = Path(str(spec))
    if folder.is_dir() and (folder / "run.json").is_file():
        run, problem = read_json(folder / "run.json")
        if problem is not None or not isinstance(run, dict):
            raise GenotypeError(f"{folder / 'run.json'} is unreadable: pass a genotype JSON file instead")
        status = run.get("status")
        if status != "COMPLETED":
            raise GenotypeError(f"{spec} is a {status} run: its genotype.json is that of its last finished epoch; "
                                f"pass genotype_from={folder / 'genotype.json'} to train that cell anyway")
    genotype, source = resolve(spec, space)
    return genotype, source if source.startswith("published ") else str(Path(source).resolve())


def run_search(run: Any, config: dict[str, Any], build_task: Callable[[CollapseConfig, ControllerConfig], Any],
               metric: str, best: Callable[[Any], Any] = min, may_change: frozenset[str] = RESUMABLE_CHANGES
               ) -> dict[str, Any]:
    """What a search experiment does around its task: the collapse and controller keys checked before any data
    loads, `build_task(collapse, controller)`, the epochs (`run_tracked`), and the result (`search_result`)."""
    collapse = CollapseConfig(**config_values(CollapseConfig, config))
    controller = ControllerConfig(**config_values(ControllerConfig, config))
    _, history = run_tracked(run, config, lambda: build_task(collapse, controller), may_change, collapse=collapse)
    return search_result(history, metric, best)


def record_training(run: Any, log: Any, config: dict[str, Any], space: str, build_task: Callable[[Any], Any],
                    metric: str, best: Callable[[Any], Any], may_change: frozenset[str] = RESUMABLE_CHANGES
                    ) -> dict[str, Any]:
    """What a from-scratch training experiment does around its task: resolve `genotype_from` in `space`, record the
    genotype and where it came from (run info `genotype`, `genotype_source`, artifact `genotype.json`) and the
    parameter count (`num_parameters`), run the epochs of `build_task(genotype)` (`run_tracked`), then test (metrics
    logged at the last epoch) and return the result. A run the time limit stopped is not tested: its resumed run
    will be."""
    genotype, source = resolve_genotype(config["genotype_from"], space)
    run.info.update(genotype=to_dict(genotype), genotype_source=source)
    add_json_artifact(run, "genotype.json", to_dict(genotype))

    def build() -> Any:
        task = build_task(genotype)
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
    stop = history[-1].stop
    return {"genotype": to_dict(chosen_genotype(history)), **headline(history, metric, best),
            **({} if stop is None else {"early_stop": stop.to_dict()})}
