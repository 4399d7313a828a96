"""The operator counter against steps whose operators are known."""
from __future__ import annotations

import torch

from benchmarks.op_count import count_ops


def test_counts_every_operator_and_views_apart() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)

    def step() -> None:
        for _ in range(3):
            torch.mm(a, b)  # 3 kernels
        a.view(12).t().permute(0)  # 3 views: no kernel

    figures = count_ops(step)
    assert figures["ops"] == 6 and figures["launches"] == 3
    assert figures["most_common"]["aten.mm"] == 3 and figures["most_common"]["aten.view"] == 1


def test_counts_the_backward_too() -> None:
    x = torch.randn(5, requires_grad=True)
    forward = count_ops(lambda: x.mul(2.0).sum())
    both = count_ops(lambda: x.mul(2.0).sum().backward())
    assert both["launches"] > forward["launches"] >= 2 and x.grad is not None
    assert torch.equal(x.grad, torch.full((5,), 2.0))
