"""Train a recurrent cell from scratch on Penn Treebank (the paper's evaluation), tracked by Sacred.

    python -m experiments.rnn_train with smoke                                # half a minute on a CPU
    python -m experiments.rnn_train with paper device=cuda                    # DARTS_V2 at 850, NT-ASGD
    python -m experiments.rnn_train with paper genotype_from=runs/7 device=cuda   # the final cell of search run 7
    python -m experiments.rnn_train with paper genotype_from=my_cell.json     # a genotype JSON file
    python -m experiments.rnn_train print_config                              # every option, commented
"""
from __future__ import annotations

from typing import Any

from experiments.tracking.config import RunConfig, add_shared_config, config_values
from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from experiments.tracking.corpus import recorded_corpus
from experiments.tracking.runs import record_training
from rnn_darts.data import VocabularyConfig
from rnn_darts.model import ModelConfig
from rnn_darts.train import RNNTrainTask, TrainConfig
from shared.device import resolve_device
from shared.genotypes import RNNGenotype

# The dataclasses the config fills (their defaults and the config's must agree: tests/experiments/test_configs.py),
# with the config keys named otherwise than their fields.
CONFIGS = (RunConfig, VocabularyConfig, TrainConfig, ModelConfig)
RENAMED = {"ninp": "emsize"}

ex = make_experiment("rnn_train", globals())


@ex.config
def config() -> None:
    """The paper's PTB training of a found cell from scratch (AWD-LSTM style, averaged SGD)."""
    genotype_from = "DARTS_V2"  # a published name (DARTS_V1, DARTS_V2), a genotype JSON file, or a search run folder
    seed = 1267  # the original rnn/train.py's; seeds the weights, the dropout masks and the BPTT window lengths
    epochs = 8000  # the original rnn/train.py's default (the paper: "until convergence")
    batch_size = 64
    eval_batch_size = 10  # validation every epoch
    test_batch_size = 1  # the final test
    bptt = 35  # mean BPTT window
    max_seq_len_delta = 20  # windows are at most bptt + this
    learning_rate = 20.0  # SGD; scaled by seq_len / bptt each step
    weight_decay = 8e-7
    grad_clip = 0.25  # max norm of the gradient
    beta = 1e-3  # temporal activation regularisation
    nonmono = 5  # NT-ASGD: average the weights once validation has not beaten the best before the last 5 epochs
    train_tokens = None  # only the first N training tokens (None: all)
    eval_tokens = None  # validate on the first N valid tokens (None: all); the test always uses the whole split
    emsize = 850  # embedding size = cell size (tied decoder)
    nhid = 850
    init_range = 0.04  # the tied embedding and the cell matrices start uniform(-init_range, init_range)
    input_init_range = None  # the input rows of W0 (None: init_range, the paper)
    dropout = 0.75  # output (locked)
    dropouth = 0.25  # hidden state (per sequence)
    dropoutx = 0.75  # cell input (per sequence)
    dropouti = 0.2  # embedding output (locked)
    dropoute = 0.1  # whole words (the paper's 0.1; the original rnn/train.py's default is 0)


add_shared_config(ex, search=False, corpus=True)  # device, threads, resume, time_limit, corpus, `paper`


@ex.named_config
def smoke() -> None:
    """Half a minute on a 2-core CPU: DARTS_V2 at 64 wide, 4 epochs over the first 30k training tokens."""
    # nonmono=1: from epoch 3 on, averaging starts at the first validation worse than the best before the last epoch.
    epochs = 4
    batch_size = 32
    eval_batch_size = 64
    test_batch_size = 64
    nonmono = 1
    train_tokens = 30_000
    eval_tokens = 20_000
    emsize = 64
    nhid = 64
    dropout, dropouth, dropoutx, dropouti, dropoute = 0.2, 0.1, 0.2, 0.1, 0.0
    threads = 2


@experiment_main(ex, "test_ppl")
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    def build_task(genotype: RNNGenotype) -> RNNTrainTask:
        corpus = recorded_corpus(run, config)
        model_config = ModelConfig(ntoken=corpus.ntoken, **config_values(ModelConfig, config, RENAMED))
        return RNNTrainTask(corpus, genotype, model_config, TrainConfig(**config_values(TrainConfig, config)),
                            resolve_device(config["device"]), config["seed"])

    return record_training(run, log, config, "rnn", build_task, "valid_ppl", best=min)


if __name__ == "__main__":
    run_commandline(ex)
