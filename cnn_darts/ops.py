"""Candidate operations of the convolutional DARTS search space, registered by name.

`OPS` maps every name of `shared.genotypes.CNN_PRIMITIVES` to a factory `(C, stride, affine) -> nn.Module` that maps
(B, C, H, W) to (B, C, H/stride, W/stride). `affine` is False for the BatchNorms of the search (learnable scales would
rescale the op outputs that the alphas weigh) and True for derived networks. The building blocks `ReLUConvBN` and
`FactorizedReduce` are also used by the cells to preprocess their inputs.

Ops that begin with a ReLU (`ReLUFirst` subclasses) expose `body`, the rest of the op, so that a caller holding
`relu(x)` already can share it across ops (see `cnn_darts.supernet.MixedOp`); `forward(x) == body(relu(x))`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.registry import Registry

OpFactory = Callable[[int, int, bool], nn.Module]
OPS: Registry[OpFactory] = Registry("cnn op")


class Zero(nn.Module):
    """The 'none' op: zeros of the output shape (B, C, H/stride, W/stride)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # A strided slice gives the same output size as the other ops' stride-2 convs with "same" padding.
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUFirst(nn.Module):
    """An op computing `body(relu(x))`; callers that already hold `relu(x)` call `body` directly."""

    body: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.body(F.relu(x))


class ReLUConvBN(ReLUFirst):
    """ReLU -> conv (kernel_size, stride, padding) -> BN: (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


def _dw_pw_bn(C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool) -> list[nn.Module]:
    """Depthwise conv (groups=C_in) then pointwise 1x1 conv then BN, without the leading ReLU."""
    return [
        nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
        nn.Conv2d(C_in, C_out, 1, bias=False),
        nn.BatchNorm2d(C_out, affine=affine),
    ]


class DilatedDepthwiseConv2d(nn.Conv2d):
    """A depthwise conv with dilation d and "same" padding d * (k - 1) / 2, computed without dilation on CPU.

    oneDNN runs dilated depthwise convs (their backward above all) through a slow generic kernel, several times
    slower than the undilated ones. Dilation d only ever mixes pixels whose coordinates agree modulo d, so the same
    output comes from an undilated conv over the d * d phase sub-images moved into the batch (space-to-batch), and
    at stride d from an undilated conv over the one phase that is sampled. Same weight, same result, exact
    gradients; other devices and odd sizes take the plain dilated conv.
    """

    def __init__(self, C: int, kernel_size: int, stride: int, dilation: int) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        super().__init__(C, C, kernel_size, stride=stride, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        d, (stride, _) = self.dilation[0], self.stride
        B, C, H, W = x.shape
        undilated = self.kernel_size[0] // 2  # padding of the undilated conv
        if x.device.type != "cpu" or d == 1 or stride not in (1, d) or (stride == 1 and (H % d or W % d)):
            return super().forward(x)
        if stride == d:  # only the pixels at multiples of d are read: (B, C, ceil(H/d), ceil(W/d))
            return F.conv2d(x[:, :, ::d, ::d], self.weight, padding=undilated, groups=C)
        h, w = H // d, W // d
        # (B, C, H, W) -> (B, h, d, w, d, C) -> phases into the batch: (d*d*B, C, h, w), channels-last in memory.
        phases = x.permute(0, 2, 3, 1).reshape(B, h, d, w, d, C).permute(2, 4, 0, 1, 3, 5)
        phases = phases.reshape(d * d * B, h, w, C).permute(0, 3, 1, 2)
        y = F.conv2d(phases, self.weight, padding=undilated, groups=C)  # (d*d*B, C, h, w)
        # Back: (d, d, B, h, w, C) -> (B, h, d, w, d, C) -> (B, C, H, W).
        y = y.permute(0, 2, 3, 1).reshape(d, d, B, h, w, C).permute(2, 3, 0, 4, 1, 5)
        return y.reshape(B, H, W, C).permute(0, 3, 1, 2)


class DilConv(ReLUFirst):
    """ReLU -> dilated depthwise conv ("same" padding) -> pointwise conv -> BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, dilation: int, affine: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            DilatedDepthwiseConv2d(C_in, kernel_size, stride, dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(ReLUFirst):
    """Two rounds of ReLU -> depthwise conv -> pointwise conv -> BN; only the first round may stride."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_dw_pw_bn(C_in, C_in, kernel_size, stride, padding, affine),
            nn.ReLU(inplace=False),
            *_dw_pw_bn(C_in, C_out, kernel_size, 1, padding, affine),
        )


class _FactorizedReduceBody(nn.Module):
    def __init__(self, C_in: int, C_out: int, affine: bool) -> None:
        super().__init__()
        # A 1x1 conv of stride 2 is a 1x1 conv of the even pixels: written so, because torch 2.13's CPU backward
        # of a strided 1x1 conv on channels-last input corrupts the heap for small channel counts (C 2 aborts).
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        # The first conv sees the even pixels, the second the odd ones, so together the two halves see every pixel.
        # (B, C_in, H, W) -> 2 x (B, C_out/2, H/2, W/2) -> (B, C_out, H/2, W/2); H and W must be even.
        return self.bn(torch.cat([self.conv_1(x[:, :, ::2, ::2]), self.conv_2(x[:, :, 1::2, 1::2])], dim=1))


class FactorizedReduce(ReLUFirst):
    """ReLU -> two offset stride-2 1x1 convs, concatenated -> BN: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, C_in: int, C_out: int, affine: bool) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got C_out={C_out}")
        self.body = _FactorizedReduceBody(C_in, C_out, affine)


def _skip_connect(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine)


OPS.add("none", lambda C, stride, affine: Zero(stride))
OPS.add("max_pool_3x3", lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1))
OPS.add("avg_pool_3x3",
        lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False))
OPS.add("skip_connect", _skip_connect)
OPS.add("sep_conv_3x3", lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine))
OPS.add("sep_conv_5x5", lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine))
# Dilation 2 widens the receptive field to 5x5 and 9x9 (padding 2 and 4, as in the original code).
OPS.add("dil_conv_3x3", lambda C, stride, affine: DilConv(C, C, 3, stride, 2, affine))
OPS.add("dil_conv_5x5", lambda C, stride, affine: DilConv(C, C, 5, stride, 2, affine))


def build_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
    """The op registered as `name` for C channels; raises KeyError naming the registered ops if unknown."""
    return OPS.get(name)(C, stride, affine)


def stem_and_cells(C: int, stem_multiplier: int, layers: int, make_cell: Callable[..., nn.Module]
                   ) -> tuple[nn.Sequential, nn.ModuleList, list[int]]:
    """The stem and the `layers` cells of a CIFAR network, built in the original's order: reductions at 1/3 and
    2/3 of the depth, where C doubles. `make_cell(C_prev_prev, C_prev, C, reduction, reduction_prev)` builds a
    cell with `multiplier * C` output channels. Returns the stem, the cells and each cell's output channels."""
    C_stem = stem_multiplier * C
    stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
    C_prev_prev, C_prev = C_stem, C_stem
    cells, channels, reduction_prev = nn.ModuleList(), [], False
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            C *= 2
        cell = make_cell(C_prev_prev, C_prev, C, reduction, reduction_prev)
        cells.append(cell)
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, cell.multiplier * C
        channels.append(C_prev)
    return stem, cells, channels


def forward_stem_and_cells(x: Tensor, stem: nn.Module, cells: nn.ModuleList, classifier: nn.Module,
                           channels_last: bool, run_cell: Callable[[int, nn.Module, Tensor, Tensor], Tensor]
                           ) -> Tensor:
    """The forward of a network from `stem_and_cells`: stem, cells, global average pooling and `classifier`,
    (B, 3, H, W) -> logits (B, num_classes). `run_cell(i, cell, s0, s1)` applies cell i to the outputs of the two
    cells before it (the supernet passes its op weights, the derived network its drop-path probability)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # convs, BN, pools, sums and cat keep the layout
    s0 = s1 = stem(x)  # (B, stem_multiplier * C, H, W)
    for i, cell in enumerate(cells):
        s0, s1 = s1, run_cell(i, cell, s0, s1)
    pooled = s1.mean(dim=(2, 3))  # global average pool: (B, multiplier * C_last)
    return classifier(pooled)
