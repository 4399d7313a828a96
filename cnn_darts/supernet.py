"""The DARTS convolutional supernet: cells of mixed ops weighted by softmax(alpha), and its discrete genotype.

Shapes use B = batch, C = channels of the current cell, H x W = its input resolution. The architecture parameters
`alphas_normal` and `alphas_reduce` are `nn.Parameter`s of shape (num_edges, num_ops) registered on the module, so
they live in the state dict, and their softmax is taken inside `forward`, so that
`torch.func.functional_call(model, {"alphas_normal": a, ...}, x)` searches with the substituted tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_darts.ops import OPS, FactorizedReduce, ReLUConvBN, ReLUFirst, forward_stem_and_cells, stem_and_cells
from shared.compiled import compile_unit
from shared.errors import ConfigError
from shared.genotypes import CNN_PRIMITIVES, CNNGenotype, Edge
from shared.sampling import Decision, none_column, one_hot_logits
from shared.validation import check_fields

ALPHA_NAMES: tuple[str, str] = ("alphas_normal", "alphas_reduce")


@dataclass(frozen=True)
class SupernetConfig:
    """Size and search space of the supernet; the defaults are the paper's CIFAR-10 search."""

    C: int = 16  # channels of the first cell; doubled at each reduction cell
    num_classes: int = 10
    layers: int = 8  # cells; reductions at layers // 3 and 2 * layers // 3
    steps: int = 4  # intermediate nodes per cell
    multiplier: int | None = None  # the last `multiplier` nodes are concatenated into the cell output; None: all
    stem_multiplier: int = 3  # the stem outputs stem_multiplier * C channels
    primitives: tuple[str, ...] = CNN_PRIMITIVES  # candidate ops, in alpha-column order
    # Run on channels-last (NHWC) activations: oneDNN's depthwise convs and pools are 2-5x faster on CPU that way.
    channels_last: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.multiplier is None:
            object.__setattr__(self, "multiplier", self.steps)
        object.__setattr__(self, "primitives", tuple(self.primitives))
        for name in ("C", "num_classes", "layers", "steps", "multiplier", "stem_multiplier"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.C % 2:
            raise ConfigError(f"C must be even (FactorizedReduce splits channels in two), got {self.C}")
        if self.multiplier > self.steps:
            raise ConfigError(f"multiplier={self.multiplier} exceeds steps={self.steps}: "
                              f"the cell output concatenates the last `multiplier` of its `steps` nodes")
        registered = ", ".join(OPS.names())
        for name in self.primitives:
            if name not in OPS:
                raise ConfigError(f"primitives: unknown op {name!r}; registered ops: {registered}")
        if len(set(self.primitives)) != len(self.primitives):
            raise ConfigError(f"primitives lists an op twice: {self.primitives}")
        if not any(name != "none" for name in self.primitives):
            raise ConfigError(f"primitives needs at least one op other than 'none'; registered ops: {registered}")

    @property
    def num_edges(self) -> int:
        """Edges per cell: node i has 2 + i inputs (the two cell inputs and the earlier nodes); 14 for 4 steps."""
        return sum(2 + i for i in range(self.steps))


class MixedOp(nn.Module):
    """One edge: sum_k softmax(alpha)_k * op_k(x) over the candidate ops, `ops[k]` being column k of the alphas.

    The 'none' op is built (so `ops` lines up with the alpha columns) but never run: its output is zero, so leaving
    it out of the sum changes neither the output nor any gradient (alpha_none still gets its softmax gradient).
    Pooling ops get a non-affine BN, as in the original code, to bring their scale in line with the conv ops.
    """

    def __init__(self, C: int, stride: int, primitives: tuple[str, ...]) -> None:
        super().__init__()
        self.ops = nn.ModuleList()
        for name in primitives:
            op = OPS.get(name)(C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
        self.active: tuple[int, ...] = tuple(k for k, name in enumerate(primitives) if name != "none")
        # The active columns as a slice where they are consecutive (always, with 'none' first): a view, no gather.
        consecutive = self.active == tuple(range(self.active[0], self.active[-1] + 1))
        self._columns: slice | None = slice(self.active[0], self.active[-1] + 1) if consecutive else None

    def forward(self, x: Tensor, weights: Tensor, relu_x: Tensor | None = None) -> Tensor:
        """(B, C, H, W), weights (num_ops,) -> (B, C, H/stride, W/stride).

        `relu_x`, if given, is `relu(x)`, shared by the ops that start with a ReLU instead of each recomputing it.
        """
        outputs = []
        for k in self.active:
            op = self.ops[k]
            outputs.append(op.body(relu_x) if relu_x is not None and isinstance(op, ReLUFirst) else op(x))
        if self._columns is not None:
            active_weights = weights[self._columns]
        else:
            active_weights = weights[torch.tensor(self.active, device=weights.device)]
        return weighted_sum(outputs, active_weights)


def weighted_sum(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_k weights[k] * tensors[k] for K tensors of one shape (B, C, H, W) and weights (K,).

    Stacking costs a copy, but then one matrix-vector product does the sum and two do its backward, where a chain
    of multiply-adds runs about 4K kernels (and as many thread wake-ups on the CPU: each is a parallel region).
    """
    first = tensors[0]
    nhwc = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
    # Channels-last tensors are NHWC-contiguous: permuting to (B, H, W, C) views them as plain contiguous arrays.
    flat = [t.permute(0, 2, 3, 1) for t in tensors] if nhwc else tensors
    stacked = torch.stack(flat).flatten(1)  # (K, numel)
    out = (weights @ stacked).view(flat[0].shape)
    return out.permute(0, 3, 1, 2) if nhwc else out


class SearchCell(nn.Module):
    """A cell of the search: two preprocessed inputs, `steps` nodes each summing MixedOps over all earlier states,
    output the concatenation of the last `multiplier` nodes: (B, multiplier * C, H', W')."""

    def __init__(self, config: SupernetConfig, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = config.steps
        self.multiplier = config.multiplier
        # s0 comes from two cells back: if the previous cell reduced, s0 is twice the resolution of s1.
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for i in range(self.steps):
            for j in range(2 + i):
                # In a reduction cell only the edges from the two cell inputs stride.
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, config.primitives))

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        """s0 (B, C_prev_prev, H0, W0), s1 (B, C_prev, H, W), weights (num_edges, num_ops) -> (B, mult * C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]  # each (B, C, H, W)
        relus = [F.relu(s) for s in states]  # relu of each state, shared by all its outgoing edges
        rows = weights.unbind(0)  # (num_ops,) per edge
        offset = 0
        for i in range(self.steps):
            node: Tensor | None = None
            for j, (h, relu_h) in enumerate(zip(states, relus)):
                y = self.edges[offset + j](h, rows[offset + j], relu_h)
                node = y if node is None else node + y
            assert node is not None
            offset += len(states)
            states.append(node)
            if i + 1 < self.steps:  # the last node feeds no edge
                relus.append(F.relu(node))
        return torch.cat(states[-self.multiplier:], dim=1)


class Supernet(nn.Module):
    """The search network: stem, `layers` search cells (normal cells share `alphas_normal`, reduction cells
    `alphas_reduce`), global average pooling and a linear classifier. (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, config: SupernetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SupernetConfig()
        self.stem, self.cells, channels = stem_and_cells(config.C, config.stem_multiplier, config.layers,
                                                         lambda *shape: SearchCell(config, *shape))
        self.classifier = nn.Linear(channels[-1], config.num_classes)
        shape = (config.num_edges, len(config.primitives))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, num_classes)."""
        # Softmax here, from the registered parameters, so functional_call substitutions take effect.
        weights_normal = F.softmax(self.alphas_normal, dim=-1)  # (num_edges, num_ops)
        weights_reduce = F.softmax(self.alphas_reduce, dim=-1)
        return forward_stem_and_cells(
            x, self.stem, self.cells, self.classifier, self.config.channels_last,
            lambda i, cell, s0, s1: cell(s0, s1, weights_reduce if cell.reduction else weights_normal))

    def compile_cells(self, mode: str) -> None:
        """Compile each search cell's forward (`shared.compiled.compile_unit`): its shapes are fixed by the batch."""
        for cell in self.cells:
            cell.forward = compile_unit(cell.forward, mode)

    def named_arch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The architecture parameters by name: ALPHA_NAMES."""
        return [(name, p) for name, p in self.named_parameters() if name in ALPHA_NAMES]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_arch_parameters()]

    def named_weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter that is not an architecture parameter."""
        return [(name, p) for name, p in self.named_parameters() if name not in ALPHA_NAMES]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def alpha_softmax(self) -> dict[str, Tensor]:
        """Detached softmax of each alpha: {"alphas_normal": (num_edges, num_ops), "alphas_reduce": ...}."""
        return {name: F.softmax(getattr(self, name).detach(), dim=-1) for name in ALPHA_NAMES}

    def decisions(self) -> list[Decision]:
        """The cells as choices, for the sampling strategies: per cell (normal, reduce), node and input slot an
        input, then its op (not 'none'); a node's second input is never its first."""
        ops = sum(name != "none" for name in self.config.primitives)
        decisions: list[Decision] = []
        for _ in ALPHA_NAMES:
            for i in range(self.config.steps):
                first = len(decisions)
                decisions += [Decision("input", 2 + i), Decision("op", ops),
                              Decision("input", 2 + i, distinct_from=first), Decision("op", ops)]
        return decisions

    def alphas_from(self, tokens: list[int]) -> dict[str, Tensor]:
        """One-hot alpha logits of the cells `tokens` describe (see `decisions`); every other input of a node takes
        'none', so the supernet computes those cells alone."""
        primitives = self.config.primitives
        columns = [k for k, name in enumerate(primitives) if name != "none"]
        stream, logits = iter(tokens), {}
        for name in ALPHA_NAMES:
            choice, start = [none_column(primitives)] * self.config.num_edges, 0
            for i in range(self.config.steps):
                for _ in range(2):
                    j, op = next(stream), next(stream)
                    choice[start + j] = columns[op]
                start += 2 + i
            logits[name] = one_hot_logits(self.config.num_edges, len(primitives), choice).to(getattr(self, name))
        return logits

    def genotype(self) -> CNNGenotype:
        """The discrete cells: per node the 2 incoming edges whose strongest non-'none' op weighs most, each with
        that op; the concatenated nodes are the last `multiplier` ones (2..5 for the defaults)."""
        weights = self.alpha_softmax()
        first = 2 + self.config.steps - self.config.multiplier
        concat = tuple(range(first, 2 + self.config.steps))
        return CNNGenotype(
            normal=parse_edges(weights["alphas_normal"], self.config.primitives, self.config.steps),
            normal_concat=concat,
            reduce=parse_edges(weights["alphas_reduce"], self.config.primitives, self.config.steps),
            reduce_concat=concat,
        )


def parse_edges(weights: Tensor, primitives: tuple[str, ...], steps: int) -> tuple[Edge, ...]:
    """weights (num_edges, num_ops) -> 2 * steps (op, input index) pairs, 'none' never chosen.

    Ties go to the lower input index and the earlier op, as in the original code.
    """
    masked = weights.detach().to("cpu", copy=True)  # one transfer, then plain Python on the host
    if "none" in primitives:
        masked[:, primitives.index("none")] = float("-inf")
    best_weight, best_op = masked.max(dim=-1)  # (num_edges,) each
    edges: list[Edge] = []
    start = 0
    for i in range(steps):
        end = start + 2 + i
        node_strength = best_weight[start:end].tolist()
        # sorted() is stable, so equal strengths keep the lower input index first.
        inputs = sorted(range(2 + i), key=lambda j: -node_strength[j])[:2]
        edges.extend((primitives[int(best_op[start + j])], j) for j in inputs)
        start = end
    return tuple(edges)
