"""The CNN op registry: every op builds, keeps or halves the resolution, and matches its textbook definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_darts.ops import OPS, DilatedDepthwiseConv2d, FactorizedReduce, ReLUConvBN, ReLUFirst, Zero, build_op
from shared.genotypes import CNN_PRIMITIVES

C, B, H = 4, 2, 8


def test_registry_names_are_the_cnn_primitives() -> None:
    assert OPS.names() == CNN_PRIMITIVES


def test_duplicate_registration_raises() -> None:
    with pytest.raises(KeyError, match="duplicate"):
        OPS.add("sep_conv_3x3", lambda C, stride, affine: nn.Identity())
    assert len(OPS) == len(CNN_PRIMITIVES)


def test_unknown_op_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="sep_conv_7x7.*max_pool_3x3"):
        build_op("sep_conv_7x7", C, 1, False)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", OPS.names())
def test_every_op_builds_and_keeps_or_halves_the_size(name: str, stride: int) -> None:
    torch.manual_seed(0)
    op = build_op(name, C, stride, affine=False)
    x = torch.randn(B, C, H, H, requires_grad=True)
    y = op(x)
    assert y.shape == (B, C, H // stride, H // stride)
    y.square().sum().backward()  # every op is differentiable end to end
    assert x.grad is not None


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("name", ["sep_conv_3x3", "dil_conv_5x5", "skip_connect"])
def test_batchnorm_affine_follows_the_flag(name: str, affine: bool) -> None:
    op = build_op(name, C, 2, affine)
    norms = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.affine == affine for m in norms)


@pytest.mark.parametrize(("name", "expected"), [
    # Two rounds of depthwise k*k (C*k*k) + pointwise (C*C).
    ("sep_conv_3x3", 2 * (C * 9 + C * C)),
    ("sep_conv_5x5", 2 * (C * 25 + C * C)),
    # One round.
    ("dil_conv_3x3", C * 9 + C * C),
    ("dil_conv_5x5", C * 25 + C * C),
])
def test_conv_op_parameter_counts(name: str, expected: int) -> None:
    op = build_op(name, C, 1, affine=False)
    assert sum(p.numel() for p in op.parameters()) == expected


def test_none_is_zero_with_the_strided_shape() -> None:
    x = torch.randn(B, C, H, H)
    assert torch.equal(Zero(2)(x), torch.zeros(B, C, H // 2, H // 2))
    assert isinstance(build_op("none", C, 1, False), Zero)


def test_skip_connect_is_identity_at_stride_1_and_factorized_reduce_at_2() -> None:
    x = torch.randn(B, C, H, H)
    assert torch.equal(build_op("skip_connect", C, 1, False)(x), x)
    assert isinstance(build_op("skip_connect", C, 2, False), FactorizedReduce)


def test_avg_pool_excludes_padding() -> None:
    # With count_include_pad=False a constant image stays constant at the borders too.
    x = torch.full((B, C, H, H), 3.0)
    assert torch.allclose(build_op("avg_pool_3x3", C, 1, False)(x), x)


def test_factorized_reduce_sees_even_and_odd_pixels() -> None:
    op = FactorizedReduce(C, 2 * C, affine=False)
    x = torch.randn(B, C, H, H)
    body, r = op.body, x.relu()
    # 1x1 convs at stride 2 = 1x1 convs on the even pixels and on the odd pixels.
    halves = [F.conv2d(r[:, :, ::2, ::2], body.conv_1.weight), F.conv2d(r[:, :, 1::2, 1::2], body.conv_2.weight)]
    expected = F.batch_norm(torch.cat(halves, 1), None, None, training=True)
    assert torch.allclose(op(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        FactorizedReduce(C, 3, affine=False)


@pytest.mark.parametrize("name", ["sep_conv_3x3", "dil_conv_3x3", "skip_connect"])
def test_relu_first_ops_split_into_relu_and_body(name: str) -> None:
    op = build_op(name, C, 2, False)
    assert isinstance(op, ReLUFirst)
    x = torch.randn(B, C, H, H)
    assert torch.equal(op(x), op.body(F.relu(x)))
    assert isinstance(ReLUConvBN(C, C, 1, 1, 0, affine=False), ReLUFirst)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_dilated_depthwise_conv_matches_torch(kernel_size: int, stride: int, size: int, channels_last: bool) -> None:
    """The space-to-batch computation equals the plain dilated conv, output and both gradients."""
    torch.manual_seed(0)
    conv = DilatedDepthwiseConv2d(C, kernel_size, stride, dilation=2)
    x = torch.randn(B, C, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    y = conv(x)
    ref = F.conv2d(x, weight, stride=stride, padding=kernel_size - 1, dilation=2, groups=C)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, weight), g)
    assert torch.allclose(gx, rx, atol=1e-5)
    assert torch.allclose(gw, rw, atol=1e-4)


def test_factorized_reduce_is_the_two_offset_stride_two_convolutions() -> None:
    torch.manual_seed(0)
    op = FactorizedReduce(6, 8, affine=False).train()
    x = torch.randn(3, 6, 10, 10)
    body = op.body
    halves = [F.conv2d(F.relu(x), body.conv_1.weight, stride=2),
              F.conv2d(F.relu(x)[:, :, 1:, 1:], body.conv_2.weight, stride=2)]
    expected = F.batch_norm(torch.cat(halves, dim=1), None, None, training=True)
    torch.testing.assert_close(op(x), expected)


def test_two_channel_supernet_on_channels_last_trains_without_crashing() -> None:
    """torch 2.13's strided 1x1 conv backward corrupted the heap here (abort); run it in a child process."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import torch, torch.nn.functional as F\n"
            "from cnn_darts.supernet import Supernet, SupernetConfig\n"
            "m = Supernet(SupernetConfig(C=2, layers=3, steps=2, multiplier=2, channels_last=True))\n"
            "for _ in range(3):\n"
            "    F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.randint(10, (4,))).backward()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
