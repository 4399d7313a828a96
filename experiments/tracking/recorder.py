"""The shared epoch loop's records as a Sacred run's metrics, info and artifacts."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from sacred.observers import FileStorageObserver

from shared.genotypes import to_dict
from shared.loop import chosen_genotype


def add_written_artifact(run: Any, name: str, write: Callable[[Path], Any]) -> None:
    """Store the file `write(path)` writes as the run's artifact `name` (the observers copy it from a temp folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        write(path)
        run.add_artifact(str(path), name=name)


def add_json_artifact(run: Any, name: str, data: Any) -> None:
    """Store `data` as a JSON artifact `name` of the run."""
    add_written_artifact(run, name, lambda path: path.write_text(json.dumps(data, indent=2)))


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
    `checkpoint.pt`, also an artifact for a database. Each epoch's files replace the last epoch's in every observer
    (`experiments.tracking.observers`).
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
        self.run.add_artifact(str(path), name="checkpoint.pt")  # every observer keeps the latest one only


class Unrecorded:
    """The recorder of every process but process 0 of a distributed run: process 0 records for all; this one keeps
    only what its own interruption line says (the epochs done, process 0's checkpoint)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def epoch(self, record: Any, history: list[Any]) -> None:
        self.run.info["epochs_done"] = record.epoch

    def checkpoint(self, path: Path, epoch: int) -> None:
        self.run.info["checkpoint"] = str(path)
