"""The dropouts of AWD-LSTM (Merity et al., 2018) that the recurrent DARTS search uses.

- `locked_dropout`: variational dropout over a sequence (T, B, H): one mask per sequence (B, H), shared by every time
  step, so a unit is either on or off for the whole window.
- `embedding_dropout`: drops whole words, i.e. rows of the embedding matrix, for every occurrence in the batch, and
  scales the kept rows by 1 / (1 - p).
- `dropout_mask`: the scaled Bernoulli mask both use, also used directly by the cell for its input and hidden masks.

Masks are drawn from torch's global RNG (never a private generator): the bilevel engine snapshots and replays that
state so that two passes through the same batch see the same masks. p = 0 or eval mode draws nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dropout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A mask of `shape` with entries 0 (probability p) or 1 / (1 - p), on `like`'s device and dtype."""
    keep = 1.0 - p
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout of x (T, B, H): one (B, H) mask for the whole sequence. Identity if not training or p = 0."""
    if not training or p == 0.0:
        return x
    mask = dropout_mask((1, x.size(1), x.size(2)), p, x)  # (1, B, H), broadcast over T
    return x * mask


def embedding_dropout(weight: Tensor, tokens: Tensor, p: float, training: bool) -> Tensor:
    """Embed tokens (T, B) with `weight` (ntoken, ninp), dropping whole words: (T, B, ninp).

    Equal to `F.embedding(tokens, weight * row_mask)` with a (ntoken, 1) mask as in AWD-LSTM, but scales only the
    looked-up rows, so neither pass touches the whole (ntoken, ninp) matrix.
    """
    emb = F.embedding(tokens, weight)  # (T, B, ninp)
    if not training or p == 0.0:
        return emb
    row_mask = dropout_mask((weight.size(0),), p, weight)  # (ntoken,): one draw per word of the vocabulary
    return emb * row_mask[tokens].unsqueeze(-1)  # (T, B, 1): every occurrence of a word shares its draw
