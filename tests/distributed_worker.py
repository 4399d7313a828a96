"""One process of a distributed test: `python -m tests.distributed_worker FOLDER` in each process a test starts (env
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun sets them). It runs a few search steps of tiny tasks in both
spaces and every case of CASES, and saves what they end with to FOLDER/rank<R>.pt; a test compares the processes
with each other and with `search` run alone in one process on the same global batch.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import torch

from cnn_darts.data import synthetic_images
from cnn_darts.network import NetworkConfig
from cnn_darts.search import CNNSearchTask, SearchConfig as CNNSearchConfig
from cnn_darts.supernet import SupernetConfig as CNNSupernetConfig
from cnn_darts.train import CNNTrainTask, TrainConfig as CNNTrainConfig
from rnn_darts.data import load_corpus
from rnn_darts.model import ModelConfig
from rnn_darts.search import RNNSearchTask, SearchConfig as RNNSearchConfig
from rnn_darts.supernet import SupernetConfig as RNNSupernetConfig
from rnn_darts.train import RNNTrainTask, TrainConfig as RNNTrainConfig
from shared import checkpoint, distributed
from shared.errors import CheckpointError
from shared.genotypes import published, to_dict
from tests.cnn_darts.test_search import tiny_images
from tests.rnn_darts.test_search import write_corpus

CASES = (("rnn", "first"), ("rnn", "second"), ("rnn", "exact"), ("cnn", "first"), ("cnn", "second"), ("rnn", "train"),
         ("cnn", "train"))  # (space, search order or a training)
STEPS = 5
# Few BatchNorms (each costs a collective per pass, about 2 ms with gloo on 2 cores): steps, ops, evaluation.
CNN_OPS = ("none", "skip_connect", "sep_conv_3x3")
NO_DROPOUT = dict(dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0, dropoute=0.0)


def run_case(space: str, order: str, data: Path) -> dict[str, Any]:
    """STEPS search steps (or a training epoch) and an evaluation of a tiny task of `space` with the global batch 4
    (RNN) or 8 (CNN), no dropout: the model's state, the genotype, the metrics, and the alphas (a training's
    weights) it started from and ended with. The RNN runs in float64: at its learning rate 20
    five steps turn float32's different summation orders (one process: one mean; two: a mean of means) into 1e-5
    differences, and Adam's first steps on alphas whose gradient is near 0 into more."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64 if space == "rnn" else torch.float32)
    if order == "train" and space == "rnn":  # DARTS_V2 from scratch: an epoch of about 50 windows
        corpus = load_corpus(data)
        config = RNNTrainConfig(batch_size=4, eval_batch_size=4, test_batch_size=2, bptt=4)
        model = ModelConfig(ntoken=corpus.ntoken, ninp=12, nhid=12, **NO_DROPOUT)
        task: Any = RNNTrainTask(corpus, published("rnn", "DARTS_V2"), model, config, torch.device("cpu"), seed=0)
        initial = [p.detach().clone() for p in task.model.parameters()]
        metrics = {**task.train_epoch(1), **task.evaluate(), **task.test()}
    elif order == "train":  # DARTS_V2 from scratch, cutout and all: 40 images, five steps of 8
        config = CNNTrainConfig(epochs=2, batch_size=8, eval_batch_size=6, cutout_size=8)
        images = synthetic_images(40, 10)
        task = CNNTrainTask(images, published("cnn", "DARTS_V2"), NetworkConfig(C=4, layers=3, auxiliary=False),
                            config, torch.device("cpu"), seed=0)
        initial = [p.detach().clone() for p in task.model.parameters()]
        metrics = {**task.train_epoch(1), **task.evaluate()}
    elif space == "rnn":
        corpus = load_corpus(data)
        config = RNNSearchConfig(order=order, batch_size=4, eval_batch_size=4, bptt=4, eval_tokens=48)
        model = RNNSupernetConfig(ntoken=corpus.ntoken, ninp=12, nhid=12, steps=2, **NO_DROPOUT)
        task = RNNSearchTask(corpus, model, config, torch.device("cpu"), seed=0)
        initial = [a.detach().clone() for a in task.model.arch_parameters()]
        for _ in itertools.islice(task.steps(task.epoch_windows()), STEPS):
            pass
        metrics = task.evaluate()
    else:  # 80 images: halves of 40, five steps of 8 in an epoch
        config = CNNSearchConfig(order=order, epochs=3, batch_size=8)
        model = CNNSupernetConfig(C=4, num_classes=2, layers=3, steps=1, primitives=CNN_OPS)
        task = CNNSearchTask(tiny_images(80), model, config, torch.device("cpu"), seed=0)
        initial = [a.detach().clone() for a in task.model.arch_parameters()]
        metrics = {**task.train_epoch(1), **task.evaluate()}
    torch.set_default_dtype(torch.float32)
    state = {name: tensor.detach().clone() for name, tensor in task.model.state_dict().items()}
    return {"state": state, "genotype": to_dict(task.genotype()), "metrics": metrics, "initial": initial,
            "final": [p.detach().clone() for p in (task.model.parameters() if order == "train"
                                                   else task.model.arch_parameters())]}


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    processes = distributed.start(torch.device("cpu"), sync_batch_norm=True)
    corpus = write_corpus(folder / f"corpus{processes.rank}")
    results: dict[Any, Any] = {case: run_case(*case, corpus) for case in CASES}
    try:  # process 0 alone reads a checkpoint; its error reaches every process
        distributed.from_main(lambda: checkpoint.load(folder / "absent.pt"))
    except CheckpointError as error:
        results["from_main"] = str(error)
    torch.save(results, folder / f"rank{processes.rank}.pt")
    distributed.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
