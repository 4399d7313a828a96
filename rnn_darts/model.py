"""The derived recurrent network: a searched genotype's cell in the paper's evaluation model (rnn/model.py of
quark0/darts), trained from scratch.

The cell has the search cell's input step and one matrix per node, but each node reads a single predecessor through
a single activation, as the genotype says, and there is no BatchNorm:

    c_0, h_0 = split(cat(x_t * x_mask, h_{t-1} * h_mask) @ W0),   s_0 = h_{t-1} + sigmoid(c_0) * (tanh(h_0) - h_{t-1})
    c_i, h_i = split((s_p * h_mask) @ Ws[i]),                     s_i = s_p + sigmoid(c_i) * (f_i(h_i) - s_p)

with (f_i, p) = genotype.recurrent[i], and h_t the mean of the states named by genotype.concat.

    tokens (T, B) -> embed (T, B, ninp) -> cell, stepwise -> outputs (T, B, nhid) -> decoder -> logits (T, B, ntoken)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rnn_darts.network import HighwayCell, TiedLanguageModel, check_config
from rnn_darts.ops import ACTIVATIONS
from shared.genotypes import RNNGenotype


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and dropouts of the evaluation network; the defaults are the paper's PTB training (appendix A.2)."""

    ntoken: int = 10_000  # vocabulary size (PTB's); the experiments take it from the corpus
    ninp: int = 850  # embedding size; tied to the decoder, so it equals nhid
    nhid: int = 850
    dropout: float = 0.75  # locked dropout on the cell outputs
    dropouth: float = 0.25  # the cell's hidden-state mask, one per sequence
    dropoutx: float = 0.75  # the cell's input mask, one per sequence
    dropouti: float = 0.2  # locked dropout on the embedding output
    dropoute: float = 0.1  # word dropout
    init_range: float = 0.04  # the tied embedding and the cell matrices are uniform(-init_range, init_range)
    input_init_range: float | None = None  # the input rows of W0 (None: init_range, the paper)

    def __post_init__(self) -> None:
        check_config(self, ("ntoken", "ninp", "nhid"), ("ninp", "nhid"))


class DerivedCell(HighwayCell):
    """The genotype's recurrent cell: node i reads one predecessor through one activation with its matrix Ws[i]."""

    def __init__(self, config: ModelConfig, genotype: RNNGenotype) -> None:
        super().__init__(config.ninp, config.nhid, len(genotype.recurrent), config.init_range,
                         config.input_init_range)
        self.genotype = genotype
        self.activations = tuple(ACTIVATIONS.get(name) for name, _ in genotype.recurrent)

    def forward(self, inputs: Tensor, hidden: Tensor, x_mask: Tensor | None = None,
                h_mask: Tensor | None = None) -> Tensor:
        """inputs (T, B, ninp), hidden (B, nhid), per-sequence masks (B, ninp) / (B, nhid) or None -> (T, B, nhid)."""
        return self.unroll(inputs, hidden, x_mask, lambda xw, h, w_h: self.step(xw, h, w_h, h_mask))

    def step(self, xw: Tensor, h_prev: Tensor, w_h: Tensor, h_mask: Tensor | None) -> Tensor:
        states = [self.first_state(xw, h_prev, w_h, h_mask)]
        for (_, pred), W, f in zip(self.genotype.recurrent, self.Ws, self.activations):
            s_prev = states[pred]
            c, h = ((s_prev if h_mask is None else s_prev * h_mask) @ W).split(self.nhid, dim=-1)
            states.append(torch.lerp(s_prev, f(h), c.sigmoid()))
        return torch.stack([states[i] for i in self.genotype.concat]).mean(0)  # (B, H)


class RNNModel(TiedLanguageModel):
    """Tied embedding/decoder around one `DerivedCell`, with AWD-LSTM's dropouts; the same interface as the search
    supernet: `forward(tokens, hidden) -> (logits, new_hidden, outputs, dropped_outputs)`."""

    def __init__(self, config: ModelConfig, genotype: RNNGenotype) -> None:
        super().__init__(config, lambda: DerivedCell(config, genotype))
        self.init_embedding()

    def forward(self, tokens: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        emb, x_mask, h_mask = self.embed(tokens)
        return self.decode(self.cell(emb, hidden[0], x_mask, h_mask))

    def num_parameters(self) -> int:
        """Parameters counted once (the tied matrix once)."""
        return sum(p.numel() for p in self.parameters())
