"""The derived recurrent network: a searched genotype's cell in the paper's evaluation model (rnn/model.py of
quark0/darts), trained from scratch.

The cell has the search cell's input step and one matrix per node, but each node reads a single predecessor through
a single activation, as the genotype says, and there is no BatchNorm:

    c_0, h_0 = split(cat(x_t * x_mask, h_{t-1} * h_mask) @ W0),   s_0 = h_{t-1} + sigmoid(c_0) * (tanh(h_0) - h_{t-1})
    c_i, h_i = split((s_p * h_mask) @ Ws[i]),                     s_i = s_p + sigmoid(c_i) * (f_i(h_i) - s_p)

with (f_i, p) = genotype.recurrent[i], and h_t the mean of the states named by genotype.concat.

    tokens (T, B) -> embed (T, B, ninp) -> cell, step by step -> outputs (T, B, nhid) -> decoder -> logits (T, B, ntoken)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnn_darts.dropout import dropout_mask, embedding_dropout, locked_dropout
from rnn_darts.ops import ACTIVATIONS
from shared.errors import ConfigError
from shared.genotypes import RNNGenotype


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and dropouts of the evaluation network; the defaults are the paper's PTB training (appendix A.2)."""

    ntoken: int  # vocabulary size (10,000 on PTB)
    ninp: int = 850  # embedding size; tied to the decoder, so it equals nhid
    nhid: int = 850
    dropout: float = 0.75  # locked dropout on the cell outputs
    dropouth: float = 0.25  # the cell's hidden-state mask, one per sequence
    dropoutx: float = 0.75  # the cell's input mask, one per sequence
    dropouti: float = 0.2  # locked dropout on the embedding output
    dropoute: float = 0.1  # word dropout
    init_range: float = 0.04  # cell matrices are uniform(-init_range, init_range)

    def __post_init__(self) -> None:
        for name in ("ntoken", "ninp", "nhid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.ninp != self.nhid:
            raise ConfigError(f"ninp and nhid must be equal (tied embedding and decoder), got {self.ninp}, {self.nhid}")
        for name in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


class DerivedCell(nn.Module):
    """The genotype's recurrent cell: `W0` for the input state and one matrix `Ws[i]` per node."""

    def __init__(self, config: ModelConfig, genotype: RNNGenotype) -> None:
        super().__init__()
        ninp, nhid, r = config.ninp, config.nhid, config.init_range
        self.ninp, self.nhid, self.genotype = ninp, nhid, genotype
        self.W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-r, r))  # rows: x first, then h
        self.Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-r, r)) for _ in genotype.recurrent])
        self.activations = tuple(ACTIVATIONS.get(name) for name, _ in genotype.recurrent)

    def forward(self, inputs: Tensor, hidden: Tensor, x_mask: Tensor | None = None,
                h_mask: Tensor | None = None) -> Tensor:
        """inputs (T, B, ninp), hidden (B, nhid), per-sequence masks (B, ninp) / (B, nhid) or None -> (T, B, nhid)."""
        x = inputs if x_mask is None else inputs * x_mask
        xw = x @ self.W0[: self.ninp]  # (T, B, 2H): the input half of the first matmul for all T at once
        w_h = self.W0[self.ninp:]
        outputs = []
        for t in range(inputs.size(0)):
            hidden = self.step(xw[t], hidden, w_h, h_mask)
            outputs.append(hidden)
        return torch.stack(outputs)

    def step(self, xw: Tensor, h_prev: Tensor, w_h: Tensor, h_mask: Tensor | None) -> Tensor:
        masked = h_prev if h_mask is None else h_prev * h_mask
        c0, h0 = torch.addmm(xw, masked, w_h).split(self.nhid, dim=-1)  # (B, H) each
        states = [torch.lerp(h_prev, h0.tanh(), c0.sigmoid())]
        for (_, pred), W, f in zip(self.genotype.recurrent, self.Ws, self.activations):
            s_prev = states[pred]
            c, h = ((s_prev if h_mask is None else s_prev * h_mask) @ W).split(self.nhid, dim=-1)
            states.append(torch.lerp(s_prev, f(h), c.sigmoid()))
        return torch.stack([states[i] for i in self.genotype.concat]).mean(0)  # (B, H)


class RNNModel(nn.Module):
    """Tied embedding/decoder around one `DerivedCell`, with AWD-LSTM's dropouts; the same interface as the search
    supernet: `forward(tokens, hidden) -> (logits, new_hidden, outputs, dropped_outputs)`."""

    def __init__(self, config: ModelConfig, genotype: RNNGenotype) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.ntoken, config.ninp)
        self.cell = DerivedCell(config, genotype)
        self.decoder = nn.Linear(config.ninp, config.ntoken)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        config, training = self.config, self.training
        emb = embedding_dropout(self.encoder.weight, tokens, config.dropoute, training)  # (T, B, ninp)
        emb = locked_dropout(emb, config.dropouti, training)
        batch = tokens.size(1)
        x_mask = dropout_mask((batch, config.ninp), config.dropoutx, emb) if training and config.dropoutx else None
        h_mask = dropout_mask((batch, config.nhid), config.dropouth, emb) if training and config.dropouth else None
        outputs = self.cell(emb, hidden[0], x_mask, h_mask)  # (T, B, nhid)
        dropped = locked_dropout(outputs, config.dropout, training)
        return self.decoder(dropped), outputs[-1:], outputs, dropped

    def init_hidden(self, batch_size: int) -> Tensor:
        weight = self.encoder.weight
        return torch.zeros(1, batch_size, self.config.nhid, dtype=weight.dtype, device=weight.device)

    def num_parameters(self) -> int:
        """Parameters counted once (the tied matrix once)."""
        return sum(p.numel() for p in self.parameters())
