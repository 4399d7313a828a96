"""The recurrent-cell search task: PTB batches, hidden states and losses handed to the shared loop and engine.

Per step: a training window of `bptt` tokens (one time in twenty half that) and the learning rate scaled by
its length / bptt (so xi follows it), as the original train_search.py; the next `bptt`-token window of the
architecture stream (the original read it at the training window's position); then the architecture step and the
weight step. Hidden states carry across windows, detached; they restart every epoch (the architecture stream's
also when it wraps around).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
from torch import Tensor

from rnn_darts.data import (Corpus, batchify, batchify_share, bptt_windows, check_vocabulary, get_batch,
                            scale_learning_rate, vocabulary_fingerprint)
from rnn_darts.loss import language_model_loss, perplexity_metrics, progress_postfix, stream_loss, tar
from rnn_darts.supernet import RNNSupernet, SupernetConfig
from shared import distributed
from shared.device import check_fits
from shared.bilevel import ORDERS, PRECISIONS, Bilevel, BilevelConfig, LossFn
from shared.compiled import check_compile
from shared.collapse import CollapseConfig, eigen_metrics
from shared.errors import ConfigError
from shared.genotypes import RNNGenotype
from shared.loop import EpochProgress
from shared.controller import ControllerConfig, strategy_for
from shared.sampling import check_strategy
from shared.validation import check_at_least, check_choice, check_counts, check_fields

log = logging.getLogger(__name__)
ARCH_DATA = ("valid", "train")
# Fewer sequences per process than this, normalised apart (the cell's BatchNorm uses batch statistics), learn
# visibly slower: measured on the PTB smoke in benchmarks/README.md ("torchrun").
SMALL_SHARE = 32
REWARD_C = 80.0  # REINFORCE's reward is REWARD_C / perplexity (ENAS)


@dataclass(frozen=True)
class SearchConfig:
    order: str = "second"  # first | second | exact | plain (weight steps only: a baseline and the benchmark)
    precision: str = "fp32"  # fp32 | bf16 (autocast in the weight step and the architecture passes: BilevelConfig)
    compile: str = "off"  # off | a torch.compile mode for the supernet's cells (shared.compiled.COMPILE_MODES)
    batch_size: int = 256
    eval_batch_size: int = 64  # the original's 10 leaves the batch-statistics BatchNorm too few sequences
    bptt: int = 35  # training windows: bptt, one in twenty bptt / 2 (the original search); architecture: bptt
    learning_rate: float = 20.0
    weight_decay: float = 5e-7
    grad_clip: float = 0.25
    beta: float = 1e-3  # temporal activation regularisation
    arch_learning_rate: float = 3e-3
    arch_weight_decay: float = 1e-3
    arch_data: str = "valid"  # architecture batches: the PTB valid split (paper) or a held-out part of train
    arch_fraction: float = 0.5  # with arch_data=train: the share of train held out for the architecture
    train_tokens: int | None = None  # use only the first N training tokens (smoke runs)
    eval_tokens: int | None = None  # evaluate on the first N valid tokens (None: the whole split)
    decoder_bias: str = "zero"  # zero (the paper) | unigram: start from the log word frequencies of the train split
    strategy: str = "darts"  # darts | random (weight sharing: shared.sampling) | reinforce (shared.controller)
    select_cells: int = 10  # random, reinforce: cells scored on the valid data after each epoch; the best is kept

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("order", self.order, ORDERS)
        check_choice("precision", self.precision, PRECISIONS)
        check_compile(self.order, self.compile)
        check_strategy(self.strategy, self.select_cells)
        check_at_least(self, 0, "weight_decay", "arch_weight_decay", "beta")
        check_choice("arch_data", self.arch_data, ARCH_DATA)
        if not 0 < self.arch_fraction < 1:
            raise ConfigError(f"arch_fraction must be in (0, 1), got {self.arch_fraction}")
        for name in ("batch_size", "eval_batch_size", "bptt", "learning_rate", "grad_clip", "arch_learning_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        check_counts(self, "tokens", "train_tokens", "eval_tokens")
        if self.decoder_bias not in ("zero", "unigram"):
            raise ConfigError(f"decoder_bias must be zero or unigram, got {self.decoder_bias!r}")
        if self.eval_batch_size < 2 or self.batch_size < 2:
            raise ConfigError("batch_size and eval_batch_size must be >= 2: the search cell normalises over the batch")


def warn_small_shares(config: SearchConfig) -> None:
    """Process 0 warns when the processes of a distributed run normalise few sequences each (the search cell's
    BatchNorm uses batch statistics, in evaluation too) without sync_batch_norm."""
    processes = distributed.current()
    if not processes.several or not processes.main or processes.sync_batch_norm:
        return
    for key in ("batch_size", "eval_batch_size"):
        share = getattr(config, key) // processes.world_size
        if share < SMALL_SHARE:
            log.warning("each of the %d processes normalises its own %d sequences of a %s batch (the search "
                        "cell's BatchNorm), which learns or evaluates otherwise than one process: "
                        "sync_batch_norm=True normalises the whole batch", processes.world_size, share, key)


def split_streams(corpus: Corpus, config: SearchConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The 1-D token streams for weights, architecture and evaluation."""
    train = corpus.train[:config.train_tokens] if config.train_tokens else corpus.train
    valid = corpus.valid[:config.eval_tokens] if config.eval_tokens else corpus.valid
    if config.arch_data == "valid":
        return train, corpus.valid, valid
    cut = int(len(train) * (1 - config.arch_fraction))
    return train[:cut], train[cut:], valid


def log_unigram(tokens: Tensor, ntoken: int) -> Tensor:
    """Log word frequencies with add-one smoothing, (ntoken,): the decoder bias of a model that knows no context."""
    counts = torch.bincount(tokens, minlength=ntoken).double() + 1
    return (counts / counts.sum()).log().float()


class RNNSearchTask:
    """DARTS on the recurrent search space; implements `shared.loop.EpochTask`."""

    kind = "rnn_search"  # the experiment whose checkpoints it writes

    skip_metric = "identity_ops"  # what early_stop=skip counts

    def __init__(self, corpus: Corpus, model_config: SupernetConfig, config: SearchConfig, device: torch.device,
                 seed: int, collapse: CollapseConfig = CollapseConfig(),
                 controller: ControllerConfig = ControllerConfig()) -> None:
        self.config, self.device, self.collapse = config, device, collapse
        self.vocabulary = vocabulary_fingerprint(corpus)  # checked on resume
        train, arch, valid = split_streams(corpus, config)
        warn_small_shares(config)
        self.train_data = batchify_share(train, config.batch_size, device)  # (T, b): this process's columns
        self.arch_data = batchify_share(arch, config.batch_size, device)  # (T', b)
        self.batch = self.train_data.size(1)  # this process's sequences per batch
        self.valid_data = batchify(valid, config.eval_batch_size, device)  # (T'', B_eval): stream_loss shards it
        check_fits(lambda: RNNSupernet(model_config), device, "emsize, nhid or steps")
        model = RNNSupernet(model_config)
        if config.decoder_bias == "unigram":
            # With arch_data=valid, all of train (train_tokens caps the steps, not what the bias may know); with
            # arch_data=train, only the weight stream, so no architecture token leaks into the weights.
            source = corpus.train if config.arch_data == "valid" else train
            with torch.no_grad():
                model.decoder.bias.copy_(log_unigram(source, model_config.ntoken))
        self.model = distributed.prepare(model, device)
        weight_opt = torch.optim.SGD(self.model.weight_parameters(), lr=config.learning_rate,
                                     weight_decay=config.weight_decay, foreach=True)
        arch_opt = torch.optim.Adam(self.model.arch_parameters(), lr=config.arch_learning_rate, betas=(0.9, 0.999),
                                    weight_decay=config.arch_weight_decay)
        bilevel = BilevelConfig(config.order, config.grad_clip, precision=config.precision,
                                compile=config.compile)
        self.engine = Bilevel(self.model, weight_opt, arch_opt, bilevel, distributed.average_)
        self.windows = torch.Generator().manual_seed(seed)  # window lengths: part of the checkpoint
        self.strategy = strategy_for(config.strategy, self.model, config.select_cells, seed, controller)

    # ---- losses --------------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor, hidden: Tensor, regularise: bool, keep: dict[str, Tensor] | None = None
             ) -> LossFn:
        """Cross entropy (+ TAR when `regularise`) of the window; `keep` receives the new hidden state and the CE."""

        def loss_fn(forward: Any) -> Tensor:
            logits, new_hidden, outputs, _ = forward(x, hidden)
            cross_entropy = language_model_loss(logits, y)
            if keep is not None:
                keep.update(hidden=new_hidden.detach(), cross_entropy=cross_entropy.detach())
            return cross_entropy + tar(outputs, self.config.beta) if regularise else cross_entropy

        return loss_fn

    # ---- a step and an epoch -----------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, hidden: Tensor, xa: Tensor, ya: Tensor, arch_hidden: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """One search step on the window x -> y (architecture window xa -> ya): the learning rate scaled by the
        window length, the strategy's architecture step (none for plain and the sampling strategies), the weight
        step. Returns the new hidden states (weights, architecture) and the window's cross entropy, all detached
        and on the device. The learning rate stays scaled for this window; `train_epoch` puts it back at the end of
        the epoch."""
        config = self.config
        scale_learning_rate(self.engine.weight_optimizer, config.learning_rate, x.size(0), config.bptt)
        keep: dict[str, Tensor] = {}
        arch_keep = {"hidden": arch_hidden}  # what the architecture loss leaves (plain, sampling: it never runs)
        self.strategy.arch_step(self.engine, self.loss(x, y, hidden, True),
                                self.loss(xa, ya, arch_hidden, False, arch_keep))
        with self.strategy.weight_cell():
            self.engine.weight_step(self.loss(x, y, hidden, True, keep))
        self.strategy.update(lambda: self.reward(xa, ya))
        return keep["hidden"], arch_keep["hidden"], keep["cross_entropy"]

    def reward(self, xa: Tensor, ya: Tensor) -> float:
        """REINFORCE's reward for the cell set: REWARD_C / perplexity on the architecture window (ENAS), no dropout,
        from a zero state; the mean over the processes of a distributed run."""
        self.model.eval()
        with torch.no_grad():
            logits, *_ = self.model(xa, self.model.init_hidden(xa.size(1)))
            cross_entropy = distributed.mean(float(language_model_loss(logits, ya)))  # the whole batch's
        self.model.train()
        return REWARD_C / math.exp(min(cross_entropy, 50.0))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        windows = self.epoch_windows()
        progress = EpochProgress(len(windows), f"epoch {epoch}", progress_postfix)
        for seq_len, cross_entropy in self.steps(windows):
            progress.add(cross_entropy=cross_entropy * seq_len, tokens=seq_len)
        scale_learning_rate(self.engine.weight_optimizer, self.config.learning_rate, 1, 1)
        sums = progress.close()
        return {**perplexity_metrics("train", sums["cross_entropy"] / sums["tokens"]), **self.curvature(epoch),
                **self.strategy.epoch_metrics()}

    def curvature(self, epoch: int) -> dict[str, float]:
        """The dominant eigenvalue of the architecture loss's Hessian in the alphas, on a fixed batch (the first
        architecture window from a zero state, training mode as the architecture step), when `epoch` measures."""
        if not self.collapse.measures(epoch) or not self.strategy.trains_alphas:
            return {}
        self.model.train()
        xa, ya = get_batch(self.arch_data, 0, self.config.bptt)
        loss = self.loss(xa, ya, self.model.init_hidden(self.batch), False)
        return eigen_metrics(self.engine.alpha_hessian_eigen(loss, self.collapse.hessian_iterations,
                                                             self.collapse.hessian_tol))

    def epoch_windows(self) -> list[tuple[int, int]]:
        """An epoch's training windows (start, length) over the whole weight stream, drawn from `self.windows`."""
        return list(bptt_windows(self.train_data.size(0) - 1, self.config.bptt, self.windows, spread=0.0))

    def steps(self, windows: list[tuple[int, int]]) -> Iterator[tuple[int, Tensor]]:
        """Search steps over `windows` from fresh hidden states; yields each window's length and cross entropy.
        Every step sets training mode first, so a caller may evaluate between steps."""
        config, model = self.config, self.model
        hidden = arch_hidden = model.init_hidden(self.batch)
        arch_pos = 0
        for start, seq_len in windows:
            model.train()
            x, y = get_batch(self.train_data, start, seq_len)
            if arch_pos + 1 >= self.arch_data.size(0):  # the architecture stream wraps around: restart its state
                arch_pos, arch_hidden = 0, model.init_hidden(self.batch)
            xa, ya = get_batch(self.arch_data, arch_pos, config.bptt)
            arch_pos += xa.size(0)
            hidden, arch_hidden, cross_entropy = self.train_step(x, y, hidden, xa, ya, arch_hidden)
            yield x.size(0), cross_entropy

    def evaluate(self) -> dict[str, float]:
        """Cross entropy and perplexity over the evaluation stream, in fixed bptt windows, hidden state carried; for
        the sampling strategies those of the best of `select_cells` sampled cells, which becomes the genotype."""
        def score() -> dict[str, float]:
            return perplexity_metrics("valid", stream_loss(self.model, self.valid_data, self.config.bptt))

        return self.strategy.select(score, "valid_loss")

    # ---- what the loop records -----------------------------------------------------------------------------------
    def genotype(self) -> RNNGenotype:
        with self.chosen():
            return self.model.genotype()

    def chosen(self) -> ContextManager[None]:
        """The alphas the genotype is read from: the model's own, or a sampling strategy's best cell."""
        return self.strategy.chosen()

    def genotype_metrics(self, genotype: RNNGenotype) -> dict[str, float]:
        ops = [op for op, _ in genotype.recurrent]
        return {"identity_share": ops.count("identity") / len(ops), "identity_ops": float(ops.count("identity"))}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.engine.optimizers()

    def alpha_softmax(self) -> dict[str, Tensor]:
        with self.chosen():
            return {"alphas": self.model.alpha_softmax()}

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows.get_state(), "vocabulary": self.vocabulary,
                "sampler": self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_vocabulary(state.get("vocabulary"), self.vocabulary)
        self.windows.set_state(state["windows"])
        self.strategy.load_state_dict(state.get("sampler", {}))  # older DARTS checkpoints hold none
