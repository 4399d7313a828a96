"""What the experiment tests share: each task's generated data, and its smoke configs shrunk to that data."""
from __future__ import annotations

from pathlib import Path

from tests.cnn_darts.test_data import _fake_objects, _pickled, _write
from tests.conftest import RunResult, run_experiment
from tests.rnn_darts.test_search import write_corpus

# The search's smoke config shrunk to the generated data, seconds per run: rnn, a 30-word corpus; cnn, 32 of the
# generated images (2 steps an epoch) in the official folder layout.
TINY = {"rnn": ("batch_size=4", "eval_batch_size=3", "bptt=6", "emsize=12", "nhid=12", "steps=3", "train_tokens=None",
                "threads=1"),
        "cnn": ("train_images=32", "batch_size=8", "init_channels=4", "layers=3", "steps=2", "threads=1")}
# The training's smoke config shrunk to the same data.
TRAIN_TINY = {"rnn": ("batch_size=4", "eval_batch_size=3", "test_batch_size=2", "bptt=6", "max_seq_len_delta=3",
                      "emsize=12", "nhid=12", "train_tokens=None", "eval_tokens=None", "threads=1"),
              "cnn": ("train_images=None", "valid_images=12", "test_images=None", "batch_size=8", "init_channels=4",
                      "layers=3", "threads=1")}


def tiny_data(task: str, folder: Path) -> Path:
    """The generated data of `task` under `folder` (written when missing): rnn, a three-file corpus in corpus/;
    cnn, CIFAR-10's python files in cifar10/."""
    if task == "rnn":
        corpus = folder / "corpus"
        return corpus if corpus.exists() else write_corpus(corpus)
    images = folder / "cifar10"
    return images if images.exists() else _write(images, "folder", _pickled(_fake_objects()))


def tiny_search(task: str, tmp_path: Path, *args: str, runs: Path | None = None) -> RunResult:
    """`<task>_search with smoke` on the generated data under `tmp_path`, shrunk to it, then `args`."""
    return run_experiment(f"{task}_search", "with", "smoke", f"data_dir={tiny_data(task, tmp_path)}", *TINY[task],
                          *args, runs=runs or tmp_path / "runs")
