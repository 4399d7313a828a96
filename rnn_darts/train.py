"""Training a derived recurrent cell from scratch on PTB: the paper's evaluation recipe (rnn/train.py of quark0/darts).

Per step: a BPTT window of random length, the learning rate scaled by seq_len / bptt, cross entropy + TAR, the
gradient clipped, an SGD step. Hidden states carry across windows, detached; they restart every epoch.

NT-ASGD (Merity et al., 2018): once an epoch's validation loss is worse than the best of the epochs before the last
`nonmono` ones, the run keeps the running mean of the weights after every later step and validates, tests and
keeps its best with that mean. The original switched to torch.optim.ASGD(t0=0, lambd=0); with lambd = 0 that
optimizer's step is plain SGD's and its `ax` is this mean (leaving out the first step after the switch), so here the
optimizer stays SGD and the mean lives in the task and its checkpoint.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from rnn_darts.data import (Corpus, batchify, batchify_share, bptt_windows, check_vocabulary, get_batch,
                            scale_learning_rate, vocabulary_fingerprint)
from rnn_darts.loss import language_model_loss, perplexity_metrics, progress_postfix, stream_loss, tar
from rnn_darts.model import ModelConfig, RNNModel
from shared import distributed
from shared.device import check_fits
from shared.errors import ConfigError
from shared.genotypes import RNNGenotype
from shared.loop import EpochProgress, FixedGenotypeTask
from shared.validation import check_counts, check_fields


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of a from-scratch training; the defaults are the paper's (appendix A.2, rnn/train.py)."""

    batch_size: int = 64
    eval_batch_size: int = 10  # validation every epoch
    test_batch_size: int = 1  # the final test, as the original
    bptt: int = 35  # mean BPTT window
    max_seq_len_delta: int = 20  # windows are at most bptt + this
    learning_rate: float = 20.0  # SGD; scaled by seq_len / bptt each step
    weight_decay: float = 8e-7
    grad_clip: float = 0.25
    beta: float = 1e-3  # temporal activation regularisation
    nonmono: int = 5  # NT-ASGD: start averaging after this many epochs without beating the best before them
    train_tokens: int | None = None  # only the first N training tokens (smoke runs)
    eval_tokens: int | None = None  # validate on the first N valid tokens (None: all)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("batch_size", "eval_batch_size", "test_batch_size", "bptt", "learning_rate", "grad_clip",
                     "nonmono"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        check_counts(self, "tokens", "train_tokens", "eval_tokens")
        for name in ("weight_decay", "beta", "max_seq_len_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


class WeightAverage:
    """The running mean of a list of parameters over the steps it has seen."""

    def __init__(self, params: list[Tensor], state: dict[str, Any] | None = None) -> None:
        self.params = params
        self.mean = [p.detach().clone() for p in params] if state is None else state["mean"]
        self.count = 0 if state is None else state["count"]

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        torch._foreach_lerp_(self.mean, [p.detach() for p in self.params], 1.0 / self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}


@contextmanager
def swapped_weights(params: list[nn.Parameter], values: list[Tensor]) -> Iterator[None]:
    """Within the block the parameters hold `values`; afterwards their own values again."""
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, values)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, own)


class RNNTrainTask(FixedGenotypeTask):
    """A derived recurrent network trained from scratch; implements `shared.loop.EpochTask`."""

    kind = "rnn_train"  # the experiment whose checkpoints it writes

    def __init__(self, corpus: Corpus, genotype: RNNGenotype, model_config: ModelConfig, config: TrainConfig,
                 device: torch.device, seed: int) -> None:
        self.config, self.device, self.fixed_genotype = config, device, genotype
        self.vocabulary = vocabulary_fingerprint(corpus)  # checked on resume
        train = corpus.train[:config.train_tokens] if config.train_tokens else corpus.train
        valid = corpus.valid[:config.eval_tokens] if config.eval_tokens else corpus.valid
        self.train_data = batchify_share(train, config.batch_size, device)  # (T, b): this process's columns
        self.batch = self.train_data.size(1)
        self.valid_data = batchify(valid, config.eval_batch_size, device)  # (T', B_eval)
        self.test_data = batchify(corpus.test, config.test_batch_size, device)  # (T'', B_test)
        check_fits(lambda: RNNModel(model_config, genotype), device, "emsize or nhid")
        self.model = distributed.prepare(RNNModel(model_config, genotype), device)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                         foreach=True)
        self.windows = torch.Generator().manual_seed(seed)  # window lengths: part of the checkpoint
        self.average: WeightAverage | None = None  # set when NT-ASGD starts averaging
        self.averaging_from: int | None = None  # the first epoch whose steps were averaged
        self.valid_losses: list[float] = []  # before averaging: what the non-monotone trigger looks at
        self.best: dict[str, Any] = {"loss": math.inf, "epoch": 0, "weights": None}
        self.epoch = 0

    # ---- training ------------------------------------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """One SGD step on the window x -> y; returns the new hidden state and the window's cross entropy."""
        config = self.config
        scale_learning_rate(self.optimizer, config.learning_rate, x.size(0), config.bptt)
        self.optimizer.zero_grad(set_to_none=True)
        logits, hidden, outputs, _ = self.model(x, hidden)
        cross_entropy = language_model_loss(logits, y)
        (cross_entropy + tar(outputs, config.beta)).backward()
        distributed.average_([p.grad for p in self.params])
        nn.utils.clip_grad_norm_(self.params, config.grad_clip, foreach=True)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        return hidden.detach(), cross_entropy.detach()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        config, self.epoch = self.config, epoch
        self.model.train()
        hidden = self.model.init_hidden(self.batch)
        windows = list(bptt_windows(self.train_data.size(0) - 1, config.bptt, self.windows, config.max_seq_len_delta))
        progress = EpochProgress(len(windows), f"epoch {epoch}", progress_postfix)
        for start, seq_len in windows:
            x, y = get_batch(self.train_data, start, seq_len)
            hidden, cross_entropy = self.train_step(x, y, hidden)
            progress.add(cross_entropy=cross_entropy * x.size(0), tokens=x.size(0))
        scale_learning_rate(self.optimizer, config.learning_rate, 1, 1)
        sums = progress.close()
        return perplexity_metrics("train", sums["cross_entropy"] / sums["tokens"])

    # ---- evaluation and NT-ASGD ----------------------------------------------------------------------------------
    def evaluation_weights(self) -> list[Tensor]:
        """The weights validation sees: the running mean once NT-ASGD averages, else the current weights."""
        return self.average.mean if self.average is not None else [p.detach() for p in self.params]

    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity with the evaluation weights; then keep the best weights and apply the
        non-monotone trigger (from the next step on, the weights are averaged)."""
        weights = self.evaluation_weights()
        loss = self._loss_with(weights, self.valid_data)
        averaged = self.average is not None
        if loss < self.best["loss"]:
            self.best = {"loss": loss, "epoch": self.epoch, "weights": [w.clone() for w in weights]}
        nonmono = self.config.nonmono
        if not averaged and len(self.valid_losses) > nonmono and loss > min(self.valid_losses[:-nonmono]):
            self.average, self.averaging_from = WeightAverage(self.params), self.epoch + 1
        if not averaged:
            self.valid_losses.append(loss)
        return {**perplexity_metrics("valid", loss), "averaged": float(averaged)}

    def test(self) -> dict[str, float]:
        """Test loss and perplexity (batch test_batch_size) with the weights of the best validation epoch (the
        running mean once NT-ASGD averages), as the original tests its best saved model."""
        return perplexity_metrics("test", self._loss_with(self.best["weights"] or self.evaluation_weights(),
                                                          self.test_data))

    def _loss_with(self, weights: list[Tensor], data: Tensor) -> float:
        """Mean cross entropy over the batchified stream `data` with the parameters set to `weights`."""
        with swapped_weights(self.params, weights):
            return stream_loss(self.model, data, self.config.bptt)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    # ---- what the loop checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows.get_state(), "vocabulary": self.vocabulary,
                "epoch": self.epoch, "valid_losses": list(self.valid_losses),
                "average": None if self.average is None else self.average.state_dict(),
                "averaging_from": self.averaging_from, "best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`; tensors move to the task's device (checkpoints load on the CPU)."""
        check_vocabulary(state.get("vocabulary"), self.vocabulary)
        self.windows.set_state(state["windows"])
        self.epoch, self.valid_losses = state["epoch"], list(state["valid_losses"])
        self.averaging_from, self.best = state["averaging_from"], dict(state["best"])
        if self.best["weights"] is not None:
            self.best["weights"] = [w.to(self.device) for w in self.best["weights"]]
        average = state["average"]
        self.average = None if average is None else WeightAverage(
            self.params, {"mean": [m.to(self.device) for m in average["mean"]], "count": average["count"]})
