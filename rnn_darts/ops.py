"""Candidate activations of the recurrent DARTS search space, registered by name.

`ACTIVATIONS` maps every name of `shared.genotypes.RNN_PRIMITIVES` to an elementwise function on tensors. A node of
the cell combines its predecessor j through op f as `s_j + c_j * (f(h_j) - s_j)` (a highway connection), so the
activation is the only thing that differs between the ops. 'none' is registered as a zero function for
completeness (the genotype and alpha columns name it); the cells skip it rather than compute zeros.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from shared.registry import Registry

Activation = Callable[[Tensor], Tensor]
ACTIVATIONS: Registry[Activation] = Registry("rnn activation")
NONE = "none"  # the op a cell skips: it contributes nothing to a node


def zero(x: Tensor) -> Tensor:
    """The 'none' op: zeros of x's shape, differentiable like the other ops (the cells skip it instead)."""
    return x.mul(0.0)


def identity(x: Tensor) -> Tensor:
    """The 'identity' op: x itself, so the edge is a pure highway mix of s_j and h_j."""
    return x


ACTIVATIONS.add(NONE, zero)
ACTIVATIONS.add("tanh", torch.tanh)
ACTIVATIONS.add("relu", torch.relu)
ACTIVATIONS.add("sigmoid", torch.sigmoid)
ACTIVATIONS.add("identity", identity)


def get_activation(name: str) -> Activation:
    """The activation registered as `name`; raises KeyError naming the registered ones if unknown."""
    return ACTIVATIONS.get(name)
