"""Losses of the recurrent search: the language-model cross entropy and AWD-LSTM's activation regularisers.

The supernet returns the cell outputs before (`outputs`) and after (`dropped_outputs`) the output dropout; AR
penalises the size of the dropped outputs, TAR the change of the raw outputs between time steps (Merity et al.,
2018). The DARTS search uses TAR with beta = 1e-3 and no AR.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnn_darts.data import get_batch
from shared import distributed


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy of logits (T, B, ntoken) against targets (T, B) or (T * B,): log-perplexity per token."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def tar(outputs: Tensor, beta: float = 1e-3) -> Tensor:
    """Temporal activation regularisation: beta * mean((h_{t+1} - h_t)^2) over outputs (T, B, H) before dropout."""
    return beta * (outputs[1:] - outputs[:-1]).pow(2).mean()


def ar(dropped_outputs: Tensor, alpha: float = 0.0) -> Tensor:
    """Activation regularisation: alpha * mean(h^2) over the outputs after the output dropout (T, B, H)."""
    return alpha * dropped_outputs.pow(2).mean()


def perplexity_metrics(split: str, loss: float) -> dict[str, float]:
    """`{split}_loss` (mean cross entropy per token) and `{split}_ppl`, its exp (capped to stay finite)."""
    return {f"{split}_loss": loss, f"{split}_ppl": math.exp(min(loss, 700))}


def progress_postfix(sums: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss and perplexity from an epoch's sums of `cross_entropy` (per window, times its
    length) and `tokens`."""
    loss = sums["cross_entropy"] / sums["tokens"]
    return {"loss": f"{loss:.3f}", "ppl": f"{math.exp(min(loss, 50)):.1f}"}


@torch.no_grad()
def stream_loss(model: nn.Module, data: Tensor, bptt: int) -> float:
    """Mean cross entropy per token of `model` (eval mode) over a batchified stream (T, B): fixed `bptt` windows,
    the hidden state carried from window to window. exp() of it is the perplexity. The processes of a distributed
    run each take their own columns and average, when B splits evenly between them; else each reads all of it."""
    model.eval()
    processes = distributed.current()
    if processes.several and data.size(1) % processes.world_size == 0:
        return distributed.mean(_stream_loss(model, data[:, distributed.shard(data.size(1), "batch")], bptt))
    return _stream_loss(model, data, bptt)


def _stream_loss(model: nn.Module, data: Tensor, bptt: int) -> float:
    """`stream_loss` in this process alone (the model in eval mode)."""
    hidden = model.init_hidden(data.size(1))
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    for start in range(0, data.size(0) - 1, bptt):
        x, y = get_batch(data, start, bptt)
        logits, hidden, _, _ = model(x, hidden)
        total += language_model_loss(logits, y).double() * x.size(0)
    return total.item() / (data.size(0) - 1)
