"""The recurrent DARTS search supernet (Liu et al., 2019, section 2.1; rnn/model_search.py of quark0/darts).

One recurrent layer whose cell is a DAG of `steps` nodes over states s_0..s_steps. The cell input state is a highway
step of (x_t, h_{t-1}); node i mixes every earlier state s_j through every candidate activation f_k,

    c_j, h_j = split((s_j * h_mask) @ Ws[i]),   c_j = sigmoid(c_j)
    s_i      = BN( sum_j sum_{k != none} softmax(alphas)[offset_i + j, k] * (s_j + c_j * (f_k(h_j) - s_j)) )

and the cell output h_t is the mean of s_1..s_steps. Embedding and decoder are tied; the dropouts are AWD-LSTM's.
The alphas are an `nn.Parameter` on the supernet (state dict, `functional_call`), split from the weights by name.

    tokens (T, B) -> embed (T, B, ninp) -> cell, stepwise -> outputs (T, B, nhid) -> decoder -> logits (T, B, ntoken)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnn_darts.network import HighwayCell, TiedLanguageModel, check_config
from rnn_darts.ops import ACTIVATIONS, NONE
from shared.compiled import compile_unit
from shared.errors import ConfigError
from shared.genotypes import RNN_PRIMITIVES, RNNGenotype
from shared.sampling import Decision, none_column, one_hot_logits

ARCH_PARAMETER_NAMES = ("alphas",)


@dataclass(frozen=True)
class SupernetConfig:
    """Sizes, dropouts and search space of the recurrent supernet; the defaults are the paper's PTB search."""

    ntoken: int = 10_000  # vocabulary size (PTB's); the experiments take it from the corpus
    ninp: int = 300  # embedding size; tied to the decoder, so it must equal nhid
    nhid: int = 300  # cell state size
    dropout: float = 0.75  # locked dropout on the cell outputs, before the decoder
    dropouth: float = 0.25  # the cell's hidden-state mask, one per sequence
    dropoutx: float = 0.75  # the cell's input mask, one per sequence
    dropouti: float = 0.2  # locked dropout on the embedding output
    dropoute: float = 0.0  # word (embedding-row) dropout
    steps: int = 8  # intermediate nodes of the cell; the output averages all of them
    primitives: tuple[str, ...] = RNN_PRIMITIVES  # the alpha columns, in order; names from rnn_darts.ops.ACTIVATIONS
    init_range: float = 0.04  # the tied embedding and the cell matrices are uniform(-init_range, init_range)
    # The input rows of W0 (x_t's share of the first gate): None keeps init_range, as the paper. The embedding is
    # that small while the state is batch-normalised to unit scale, so at 0.04 the input barely moves the state
    # and the cell ignores its words for hundreds of steps; a small model learns within two minutes at ~1.0.
    input_init_range: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "primitives", tuple(self.primitives))
        check_config(self, ("ntoken", "ninp", "nhid", "steps"), ("ninp", "nhid"))
        _check_primitives(self.primitives)

    @property
    def num_edges(self) -> int:
        """Alpha rows: node i (0-based) has i + 1 predecessors, so 1 + 2 + ... + steps (36 for 8 steps)."""
        return self.steps * (self.steps + 1) // 2


def _check_primitives(primitives: tuple[str, ...]) -> None:
    for name in primitives:
        if name not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {name!r} in primitives; registered: {', '.join(ACTIVATIONS)}")
    if len(set(primitives)) != len(primitives):
        raise ConfigError(f"primitives has duplicate names: {', '.join(primitives)}")
    if all(name == NONE for name in primitives):
        raise ConfigError(f"primitives needs at least one op other than {NONE!r}, got {primitives}")


class SearchCell(HighwayCell):
    """The DARTS search cell: `W0` for the input state, one matrix `Ws[i]` per node shared by its predecessors.

    BatchNorm (no affine, as the original search cell) normalises s_0 and every node output, but with batch
    statistics in train *and* eval mode (`track_running_stats=False`), a deliberate departure from the original: there
    the eval pass used running statistics before they were trained, so the states compounded through the nodes and
    the time steps (the hidden state reached 1e29 within one 35-token window) and validation perplexity was NaN.
    With batch statistics there are no running buffers at all, the cell is finite from the first evaluation, and an
    architecture step has no statistics to corrupt. A batch therefore needs at least two sequences.
    """

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__(config.ninp, config.nhid, config.steps, config.init_range, config.input_init_range)
        self.steps = config.steps
        self.bn = nn.BatchNorm1d(config.nhid, affine=False, track_running_stats=False)
        # 'none' contributes nothing to a node: skip its column rather than compute zeros.
        self.op_columns = tuple(k for k, name in enumerate(config.primitives) if name != NONE)
        self.activations = tuple(ACTIVATIONS.get(config.primitives[k]) for k in self.op_columns)

    def node_weights(self, probs: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per node i: the (i+1, 1, K) softmax weights of its non-none ops and their (i+1, 1, 1) row sums."""
        active = probs[:, None, list(self.op_columns)]  # (num_edges, 1, K)
        totals = active.sum(-1, keepdim=True)  # (num_edges, 1, 1)
        sizes = list(range(1, self.steps + 1))
        return list(zip(active.split(sizes), totals.split(sizes)))

    def forward(self, inputs: Tensor, hidden: Tensor, probs: Tensor, x_mask: Tensor | None = None,
                h_mask: Tensor | None = None) -> Tensor:
        """Run the cell over inputs (T, B, ninp) from hidden (B, nhid) with op weights probs (num_edges, primitives).

        x_mask (B, ninp) and h_mask (B, nhid) are the per-sequence dropout masks (None: no dropout). Returns the cell
        outputs (T, B, nhid); the last one is the new hidden state.
        """
        weights, Ws = self.node_weights(probs), list(self.Ws)
        return self.unroll(inputs, hidden, x_mask, lambda xw, h, w_h: self.step(xw, h, w_h, Ws, weights, h_mask))

    def step(self, xw: Tensor, h_prev: Tensor, w_h: Tensor, Ws: list[Tensor], weights: list[tuple[Tensor, Tensor]],
             h_mask: Tensor | None) -> Tensor:
        """One time step: xw (B, 2H) is x_t's share of the init matmul, h_prev (B, H). Returns h_t (B, H)."""
        states = self.bn(self.first_state(xw, h_prev, w_h, h_mask)).unsqueeze(0)  # s_0: (1, B, H)
        for i in range(self.steps):
            s = self.node(states, Ws[i], *weights[i], h_mask)
            states = torch.cat([states, s.unsqueeze(0)])  # (i+2, B, H)
        return states[1:].mean(0)  # the average of the nodes s_1..s_steps

    def node(self, states: Tensor, W: Tensor, op_weights: Tensor, totals: Tensor, h_mask: Tensor | None) -> Tensor:
        """A node over states (J, B, H) with op_weights (J, 1, K) and totals (J, 1, 1) = op_weights' row sums."""
        masked = states if h_mask is None else states * h_mask
        # One matmul for all predecessors; under autocast in bf16, the rest of the cell in the states' dtype
        c, h = (masked @ W).to(states.dtype).split(self.nhid, dim=-1)  # (J, B, H) each
        acts = torch.stack([f(h) for f in self.activations], dim=1)  # (J, K, B, H)
        mixed = (op_weights @ acts.flatten(2)).to(h.dtype).view_as(h)  # sum_k w_jk f_k(h_j): (J, B, H)
        # sum_k w_jk (s_j + c_j (f_k(h_j) - s_j)) = lerp(W_j s_j, mixed_j, c_j) with W_j = sum_k w_jk.
        return self.bn(torch.lerp(totals * states, mixed, c.sigmoid()).sum(0))  # (B, H)


class RNNSupernet(TiedLanguageModel):
    """The search model: tied embedding/decoder around one `SearchCell`, with the alphas as a registered parameter.

    `forward(tokens (T, B), hidden (1, B, nhid))` returns `(logits (T, B, ntoken), new_hidden (1, B, nhid),
    outputs (T, B, nhid), dropped_outputs (T, B, nhid))`: the cell outputs before and after the output dropout, for
    activation regularisation. The op softmax is computed inside `forward` from `self.alphas`, so
    `torch.func.functional_call` may substitute any parameter, alphas included.
    """

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__(config, lambda: SearchCell(config))
        self.alphas = nn.Parameter(1e-3 * torch.randn(config.num_edges, len(config.primitives)))
        self.init_embedding()

    def forward(self, tokens: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """tokens (T, B) int64, hidden (1, B, nhid) -> logits, new hidden, outputs and dropped outputs (see class)."""
        if tokens.size(1) < 2:
            raise ValueError("the search cell normalises with batch statistics, so a batch needs >= 2 sequences; "
                             f"got tokens of shape {tuple(tokens.shape)}")
        emb, x_mask, h_mask = self.embed(tokens)  # then the output mask, in decode
        probs = F.softmax(self.alphas, dim=-1)  # (num_edges, primitives)
        return self.decode(self.cell(emb, hidden[0], probs, x_mask, h_mask))

    def compile_cells(self, mode: str) -> None:
        """Compile the cell's time step (`shared.compiled.compile_unit`): its shapes are fixed, (B, 2H) and (B, H)
        in, (B, H) out, whatever the window's length, and a window repeats it 35 times."""
        self.cell.step = compile_unit(self.cell.step, mode)

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (the alphas), for the architecture optimizer."""
        return [p for name, p in self.named_parameters() if name in ARCH_PARAMETER_NAMES]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (the tied embedding/decoder matrix once), for the weight optimizer."""
        return [p for name, p in self.named_parameters() if name not in ARCH_PARAMETER_NAMES]

    def alpha_softmax(self) -> Tensor:
        """The op weights softmax(alphas) (num_edges, primitives), detached."""
        return F.softmax(self.alphas.detach(), dim=-1)

    def decisions(self) -> list[Decision]:
        """The cell as choices, for the sampling strategies: per node its predecessor, then its op (not 'none')."""
        ops = len(self.cell.op_columns)
        return [d for i in range(self.config.steps) for d in (Decision("input", i + 1), Decision("op", ops))]

    def alphas_from(self, tokens: list[int]) -> dict[str, Tensor]:
        """One-hot alpha logits of the cell `tokens` describe (see `decisions`); the other predecessors of each
        node take 'none', so the supernet computes that cell alone."""
        choice, start = [none_column(self.config.primitives)] * self.config.num_edges, 0
        for i in range(self.config.steps):
            predecessor, op = tokens[2 * i], tokens[2 * i + 1]
            choice[start + predecessor] = self.cell.op_columns[op]
            start += i + 1
        return {"alphas": one_hot_logits(self.config.num_edges, len(self.config.primitives), choice).to(self.alphas)}

    def genotype(self) -> RNNGenotype:
        """The discrete cell: per node the (predecessor, non-none op) of largest weight, as the original `_parse`.

        Ties go to the earliest predecessor, then the earliest op, as in the original. Concat is every node.
        """
        probs = self.alpha_softmax()[:, list(self.cell.op_columns)]  # (num_edges, K)
        primitives, columns = self.config.primitives, self.cell.op_columns
        recurrent, start = [], 0
        for i in range(self.config.steps):
            block = probs[start: start + i + 1]  # (i+1, K): node i+1's predecessors 0..i
            j, k = divmod(int(block.argmax()), len(columns))  # argmax returns the first maximum: row-major ties
            recurrent.append((primitives[columns[k]], j))
            start += i + 1
        return RNNGenotype(recurrent=tuple(recurrent), concat=tuple(range(1, self.config.steps + 1)))
