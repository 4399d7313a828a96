"""What the search supernet and the derived network share: the tied language model around a recurrent cell, the
cell's input step, and the checks of their configs.

    tokens (T, B) -> embed (T, B, ninp) -> cell, stepwise -> outputs (T, B, nhid) -> decoder -> logits (T, B, ntoken)

Both cells start a time step the same way: s_0 = h_{t-1} + sigmoid(c_0) * (tanh(h_0) - h_{t-1}) with
c_0, h_0 = split(cat(x_t * x_mask, h_{t-1} * h_mask) @ W0); they differ in how their nodes read earlier states.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from rnn_darts.dropout import dropout_mask, embedding_dropout, locked_dropout
from shared.errors import ConfigError
from shared.validation import check_fields

DROPOUTS = ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute")


def check_config(config: Any, positive_ints: tuple[str, ...], tied: tuple[str, ...]) -> None:
    """One-line ConfigErrors for a network config: positive integer sizes, the `tied` sizes equal (the embedding is
    the decoder), dropouts in [0, 1), a positive init_range and input_init_range (or None)."""
    check_fields(config)
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if len({getattr(config, name) for name in tied}) > 1:
        names = f"{', '.join(tied[:-1])} and {tied[-1]}"
        raise ConfigError(f"{names} must be equal (tied embedding and decoder, one layer), got "
                          f"{', '.join(str(getattr(config, name)) for name in tied)}")
    for name in DROPOUTS:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    for name, value in (("init_range", config.init_range), ("input_init_range", config.input_init_range)):
        if value is None and name == "input_init_range":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


class HighwayCell(nn.Module):
    """`W0` (ninp + nhid, 2 nhid) for the input step and one matrix `Ws[i]` (nhid, 2 nhid) per node, and the loop
    over time; a subclass supplies `step`."""

    def __init__(self, ninp: int, nhid: int, nodes: int, init_range: float, input_init_range: float | None) -> None:
        super().__init__()
        self.ninp, self.nhid, r = ninp, nhid, init_range
        self.W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-r, r))  # rows: x first, then h
        if input_init_range is not None:  # redrawn: later matrices' draws are the same either way
            with torch.no_grad():
                self.W0[:ninp].uniform_(-input_init_range, input_init_range)
        self.Ws = nn.ParameterList([nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-r, r)) for _ in range(nodes)])

    def unroll(self, inputs: Tensor, hidden: Tensor, x_mask: Tensor | None,
               step: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Run `step(xw_t (B, 2H), h_prev (B, H), w_h (H, 2H)) -> h_t` over inputs (T, B, ninp): (T, B, nhid)."""
        x = inputs if x_mask is None else inputs * x_mask  # (T, B, ninp)
        # cat(x, h) @ W0 == x @ W0[:ninp] + h @ W0[ninp:]: the input half for all T in one matmul.
        xw = x @ self.W0[: self.ninp]  # (T, B, 2H)
        w_h = self.W0[self.ninp:]  # (H, 2H)
        outputs = []
        for t in range(inputs.size(0)):
            hidden = step(xw[t], hidden, w_h)
            outputs.append(hidden)
        return torch.stack(outputs)  # (T, B, H)

    def first_state(self, xw: Tensor, h_prev: Tensor, w_h: Tensor, h_mask: Tensor | None) -> Tensor:
        """s_0 (B, H) from x_t's share xw (B, 2H) of the input matmul and h_prev (B, H)."""
        masked = h_prev if h_mask is None else h_prev * h_mask
        c0, h0 = torch.addmm(xw, masked, w_h).to(h_prev.dtype).split(self.nhid, dim=-1)  # (B, H) each (autocast: fp32)
        return torch.lerp(h_prev, h0.tanh(), c0.sigmoid())  # h_prev + c0 * (h0 - h_prev)


class TiedLanguageModel(nn.Module):
    """Tied embedding/decoder and AWD-LSTM's dropouts around `self.cell`. A subclass builds the cell through
    `make_cell` (so parameters draw in the order encoder, cell, decoder), may add parameters, then calls
    `init_embedding`; its forward is `decode(cell(*embed(tokens)))` with whatever else its cell needs."""

    def __init__(self, config: Any, make_cell: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.ntoken, config.ninp)
        self.cell = make_cell()
        self.decoder = nn.Linear(config.ninp, config.ntoken)
        self.decoder.weight = self.encoder.weight  # tied: one matrix, listed once by named_parameters()

    def init_embedding(self) -> None:
        """The tied matrix uniform(-init_range, init_range), as the original (one INITRANGE, 0.04, for it and the
        cell): at 0.1 the first logits spread so far that the paper's supernet starts at a training cross entropy of
        10.6 on PTB, above the uniform ln(10,000) = 9.21; at 0.04 at 9.47. The decoder bias starts at zero."""
        r = self.config.init_range
        nn.init.uniform_(self.encoder.weight, -r, r)
        nn.init.zeros_(self.decoder.bias)

    def embed(self, tokens: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The dropped-out embedding (T, B, ninp) and the cell's per-sequence input and hidden masks (or None).
        Draw order (global RNG): word mask, embedding mask, cell input mask, cell hidden mask."""
        config, training = self.config, self.training
        emb = embedding_dropout(self.encoder.weight, tokens, config.dropoute, training)  # (T, B, ninp)
        emb = locked_dropout(emb, config.dropouti, training)
        x_mask = self._mask((tokens.size(1), config.ninp), config.dropoutx, emb)  # (B, ninp)
        h_mask = self._mask((tokens.size(1), config.nhid), config.dropouth, emb)  # (B, nhid)
        return emb, x_mask, h_mask

    def decode(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cell outputs (T, B, nhid) -> (logits (T, B, ntoken), new hidden (1, B, nhid), outputs, dropped outputs)."""
        dropped = locked_dropout(outputs, self.config.dropout, self.training)
        return self.decoder(dropped), outputs[-1:], outputs, dropped

    def _mask(self, shape: tuple[int, int], p: float, like: Tensor) -> Tensor | None:
        """A per-sequence dropout mask for the cell in training, None otherwise (also for p = 0: no draw)."""
        return dropout_mask(shape, p, like) if self.training and p > 0.0 else None

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Zeros (1, B, nhid) in the model's dtype, on `device` (default: the model's)."""
        weight = self.encoder.weight
        return torch.zeros(1, batch_size, self.config.nhid, dtype=weight.dtype, device=device or weight.device)
