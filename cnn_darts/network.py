"""The derived convolutional network: a searched genotype's cells stacked into the paper's CIFAR-10 evaluation model
(NetworkCIFAR of cnn/model.py in quark0/darts), trained from scratch.

    images (B, 3, 32, 32) -> stem (B, stem_multiplier * C, 32, 32)
      -> `layers` cells, reductions at layers // 3 and 2 * layers // 3 (channels x2, resolution /2)
      -> [auxiliary head on the output of cell 2 * layers // 3: (B, 4 * 4C, 8, 8) for 4 concatenated nodes]
      -> global average pool (B, C_last) -> classifier (B, num_classes)

Unlike the search cells, each node of a derived cell sums exactly two ops, as the genotype names them, with affine
BatchNorms. In training, drop path zeroes the output of each non-identity op for whole samples with probability
`drop_path_prob`, which the trainer sets every epoch (the paper ramps it linearly from 0 to 0.2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_darts.ops import OPS, FactorizedReduce, ReLUConvBN, ReLUFirst, forward_stem_and_cells, stem_and_cells
from shared.errors import ConfigError
from shared.genotypes import CNNGenotype
from shared.validation import check_fields


@dataclass(frozen=True)
class NetworkConfig:
    """Size of the evaluation network; the defaults are the paper's CIFAR-10 training (section 3.3, appendix A.2)."""

    C: int = 36  # channels of the first cell; doubled at each reduction cell
    layers: int = 20  # cells; reductions at layers // 3 and 2 * layers // 3
    num_classes: int = 10
    # Build the auxiliary head (after cell 2 * layers // 3, for 32 x 32 images); its loss weight is the trainer's.
    auxiliary: bool = True
    stem_multiplier: int = 3  # the stem outputs stem_multiplier * C channels
    # Run on channels-last (NHWC) activations: oneDNN's depthwise convs and pools are 2-5x faster on CPU that way.
    channels_last: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("C", "layers", "num_classes", "stem_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.layers < 2:
            raise ConfigError(f"layers must be at least 2 (the reduction cells at layers // 3 and 2 * layers // 3 "
                              f"must be two cells), got {self.layers}")
        for name in ("auxiliary", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


def drop_path(x: Tensor, drop_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero whole samples of x (B, ...) with probability drop_prob and scale the kept ones by 1 / (1 - drop_prob),
    so that the expected value is x. The mask (B, 1, 1, 1) is drawn on x's device from `generator`, by default the
    global torch RNG of that device (which checkpoints save, so a resumed run draws the same masks)."""
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    if drop_prob == 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep_prob, generator=generator)  # (B, 1, 1, 1): 1 keeps the sample, 0 drops it
    return x * mask.div_(keep_prob)  # one pass over x: mask and scale together


class DerivedCell(nn.Module):
    """A cell of the genotype: node i = op(states[index]) + op'(states[index']) for the edges 2i and 2i+1, output
    the concatenation of the `concat` nodes: (B, len(concat) * C, H', W'), H' = H / 2 in a reduction cell."""

    def __init__(self, genotype: CNNGenotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        # s0 comes from two cells back: if the previous cell reduced, s0 is twice the resolution of s1.
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat: tuple[int, ...] = genotype.reduce_concat if reduction else genotype.normal_concat
        self.multiplier = len(self.concat)  # the output has multiplier * C channels
        self.indices: tuple[int, ...] = tuple(index for _, index in edges)
        self.ops = nn.ModuleList()
        for name, index in edges:
            # In a reduction cell only the edges from the two cell inputs stride.
            stride = 2 if reduction and index < 2 else 1
            self.ops.append(OPS.get(name)(C, stride, True))
        # Drop path spares the identities (skip_connect at stride 1), as in the original code.
        self.droppable: tuple[bool, ...] = tuple(not isinstance(op, nn.Identity) for op in self.ops)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float = 0.0) -> Tensor:
        """s0 (B, C_prev_prev, H0, W0), s1 (B, C_prev, H, W) -> (B, multiplier * C, H', W').

        drop_prob applies in training only; the masks are drawn edge by edge in genotype order, as the original."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]  # each (B, C, H, W)
        relus: dict[int, Tensor] = {}  # relu of a state, computed once for all the ReLU-first ops reading it
        drop = self.training and drop_prob > 0.0
        for i in range(len(self.indices) // 2):
            outputs = []
            for k in (2 * i, 2 * i + 1):
                op, index = self.ops[k], self.indices[k]
                if isinstance(op, ReLUFirst):
                    if index not in relus:
                        relus[index] = F.relu(states[index])
                    y = op.body(relus[index])  # == op(states[index])
                else:
                    y = op(states[index])
                outputs.append(y)
            if drop:  # both ops first, then both masks: the original's order of random draws
                outputs = [drop_path(y, drop_prob) if self.droppable[k] else y
                           for k, y in zip((2 * i, 2 * i + 1), outputs)]
            states.append(outputs[0] + outputs[1])
        return torch.cat([states[j] for j in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier for 8 x 8 inputs (AuxiliaryHeadCIFAR): (B, C, 8, 8) -> logits (B, num_classes)."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # (B, C, 2, 2)
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),  # (B, 768, 1, 1)
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, 8, 8) -> (B, num_classes)."""
        features = self.features(x)  # (B, 768, 1, 1)
        if features.shape[2:] != (1, 1):
            raise ValueError(f"the auxiliary head expects 8 x 8 inputs (32 x 32 images), got "
                             f"{tuple(x.shape[2:])}: build the network with auxiliary=False for other image sizes")
        return self.classifier(features.flatten(1))


class NetworkCIFAR(nn.Module):
    """The evaluation network: stem, `layers` derived cells, optional auxiliary head, global average pool and a
    linear classifier. forward: images (B, 3, H, W) -> (logits (B, num_classes), auxiliary logits or None).

    The module names follow the original code (stem, cells, auxiliary_head, classifier) and every module registers
    its parameters and buffers in the original's order, so the state dicts correspond entry by entry."""

    def __init__(self, config: NetworkConfig, genotype: CNNGenotype) -> None:
        super().__init__()
        if not isinstance(genotype, CNNGenotype):
            raise ConfigError(f"genotype must be a convolutional (cnn) genotype, e.g. published('cnn', 'DARTS_V2'), "
                              f"got {type(genotype).__name__}")
        self.config, self.genotype = config, genotype
        self.aux_position = 2 * config.layers // 3  # the auxiliary head reads the output of this cell
        self.stem, self.cells, channels = stem_and_cells(
            config.C, config.stem_multiplier, config.layers, lambda *shape: DerivedCell(genotype, *shape))
        self.auxiliary_head = (AuxiliaryHead(channels[self.aux_position], config.num_classes) if config.auxiliary
                               else None)
        self.classifier = nn.Linear(channels[-1], config.num_classes)
        self._drop_path_prob = 0.0

    @property
    def drop_path_prob(self) -> float:
        """Drop-path probability of every non-identity op in training; the original ramps it as
        `drop_path_prob * epoch / epochs` at the start of each epoch. 0 (no drop path) until set."""
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"drop_path_prob must be in [0, 1), got {value}")
        self._drop_path_prob = float(value)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, 3, H, W) -> logits (B, num_classes), and auxiliary logits (B, num_classes) in training with the
        auxiliary head, else None."""
        aux_logits = None

        def run_cell(i: int, cell: nn.Module, s0: Tensor, s1: Tensor) -> Tensor:
            nonlocal aux_logits
            out = cell(s0, s1, self._drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                aux_logits = self.auxiliary_head(out)
            return out

        logits = forward_stem_and_cells(x, self.stem, self.cells, self.classifier, self.config.channels_last,
                                        run_cell)
        return logits, aux_logits

    def num_parameters(self, include_auxiliary: bool = False) -> int:
        """Number of parameters; without the auxiliary head by default, as the paper counts (3.3M for DARTS)."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if include_auxiliary or not name.startswith("auxiliary_head."))
