"""DARTS recurrent-cell search on Penn Treebank, tracked by Sacred.

    python -m experiments.rnn_search with smoke                   # about two minutes on a CPU
    python -m experiments.rnn_search with paper device=cuda       # the paper's search (second order, 50 epochs)
    python -m experiments.rnn_search with smoke resume=runs/7     # continue run 7 from its last checkpoint
    python -m experiments.rnn_search print_config                 # every option, commented
    torchrun --standalone --nproc_per_node=4 -m experiments.rnn_search with paper  # 4 GPUs (README: torchrun)
"""
from __future__ import annotations

from typing import Any

from experiments.tracking.config import RunConfig, add_shared_config, config_values
from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from experiments.tracking.corpus import recorded_corpus
from experiments.tracking.runs import run_search
from rnn_darts.data import VocabularyConfig
from rnn_darts.search import RNNSearchTask, SearchConfig
from rnn_darts.supernet import SupernetConfig
from shared.collapse import CollapseConfig
from shared.controller import ControllerConfig
from shared.device import resolve_device

# The dataclasses the config fills (their defaults and the config's must agree: tests/experiments/test_configs.py),
# with the config keys named otherwise than their fields.
CONFIGS = (RunConfig, VocabularyConfig, SearchConfig, SupernetConfig, CollapseConfig, ControllerConfig)
RENAMED = {"ninp": "emsize"}

ex = make_experiment("rnn_search", globals())


@ex.config
def config() -> None:
    """The paper's recurrent-cell search on Penn Treebank (DARTS, section 3.1)."""
    seed = 3  # seeds the supernet, the dropout masks and the BPTT window lengths
    order = "second"  # first | second (finite-difference Hessian, eq. 7) | exact (double backward) | plain
    strategy = "darts"  # darts | random (weight sharing, Li & Talwalkar 2019) | reinforce (Zoph & Le, as ENAS): README
    select_cells = 10  # random, reinforce: cells scored on the validation data after each epoch; the best is kept
    epochs = 50
    batch_size = 256  # weight and architecture batches
    eval_batch_size = 64  # evaluation on the valid split (the original's 10 is too few for batch statistics: README)
    bptt = 35  # BPTT window; one training window in twenty is half as long (the original search)
    learning_rate = 20.0  # weight SGD; scaled by seq_len / bptt each step
    weight_decay = 5e-7
    grad_clip = 0.25  # max norm of the weight gradient (real and virtual steps)
    beta = 1e-3  # temporal activation regularisation
    arch_learning_rate = 3e-3  # Adam on the alphas
    arch_weight_decay = 1e-3
    arch_data = "valid"  # valid (the paper: PTB valid) | train (a held-out part of train)
    arch_fraction = 0.5  # with arch_data=train: the share of train held out
    train_tokens = None  # only the first N training tokens (None: all)
    eval_tokens = None  # evaluate on the first N valid tokens (None: all)
    decoder_bias = "zero"  # zero (the paper) | unigram (log word frequencies of train: faster start)
    emsize = 300  # embedding size = cell size (tied decoder)
    nhid = 300
    steps = 8  # intermediate nodes of the cell
    init_range = 0.04  # the tied embedding and the cell matrices start uniform(-init_range, init_range)
    input_init_range = None  # the input rows of W0 (None: init_range, the paper); see SupernetConfig
    dropout = 0.75  # output (locked)
    dropouth = 0.25  # hidden state (per sequence)
    dropoutx = 0.75  # cell input (per sequence)
    dropouti = 0.2  # embedding output (locked)
    dropoute = 0.0  # whole words


add_shared_config(ex, search=True, corpus=True)  # device, threads, resume, time_limit, corpus, collapse, ...


@ex.named_config
def smoke() -> None:
    """About two minutes on a 2-core CPU: a 32-wide cell ends 10% or more below PTB's unigram perplexity (687)."""
    # Second order, 3 epochs of ~90 steps. Three departures from the paper let a 32-wide cell learn that fast:
    epochs = 3
    batch_size = 16
    learning_rate = 5.0  # a 32-wide cell takes lr 20 badly: its gradients explode within 50 steps
    train_tokens = 50_000  # an epoch is the first 50k training tokens
    decoder_bias = "unigram"  # start from the train split's unigram instead of the uniform 10,000
    input_init_range = 1.0  # let the words move the state from the first step (0.04: hundreds of idle steps)
    emsize = 32
    nhid = 32
    steps = 4
    dropout, dropouth, dropoutx, dropouti = 0.1, 0.05, 0.1, 0.05
    threads = 2


@experiment_main(ex, "valid_ppl")
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    def build_task(collapse: CollapseConfig, controller: ControllerConfig) -> RNNSearchTask:
        corpus = recorded_corpus(run, config)
        model_config = SupernetConfig(ntoken=corpus.ntoken, **config_values(SupernetConfig, config, RENAMED))
        return RNNSearchTask(corpus, model_config, SearchConfig(**config_values(SearchConfig, config)),
                             resolve_device(config["device"]), config["seed"], collapse, controller)

    return run_search(run, config, build_task, "valid_ppl")


if __name__ == "__main__":
    run_commandline(ex)
