"""BatchNorm over the whole batch of a distributed run: each process normalises its share with the statistics of
all shares together, as one process normalises the whole batch (`sync_batch_norm=True`). The modules need the
process group `shared.distributed.start` joined."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumAcross(torch.autograd.Function):
    """all_reduce(SUM) as a differentiable function: the gradient of a sum over processes is the sum of the
    processes' gradients (itself through this function, so that double backward crosses processes too)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumAcross.apply(grad)


class SyncedBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch, over all processes, and differentiable to
    any order through them (torch's SyncBatchNorm runs on GPUs only and has no double backward, which the `exact`
    order needs). Running statistics (eval mode): torch's own kernel."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training or not self.track_running_stats):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.numel() // input.size(1)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()  # bf16 under autocast
        local_mean = x.mean(dims)
        local_m2 = (x - local_mean.view(shape)).square().sum(dims)  # centred here: no cancellation in float32
        local_mean, local_m2 = local_mean.double(), local_m2.double()
        counts = torch.full((1,), float(count), dtype=torch.float64, device=input.device)
        sums = _SumAcross.apply(torch.cat([local_mean * count, local_m2 + count * local_mean.square(), counts]))
        channels = input.size(1)
        n = sums[-1]
        mean = sums[:channels] / n
        var = sums[channels:2 * channels] / n - mean.square()  # biased, as the normalisation uses
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        scale = (var + self.eps).rsqrt()
        out = (input - mean.to(input.dtype).view(shape)) * scale.to(input.dtype).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def synced_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by a `SyncedBatchNorm` holding the same parameters and buffers (the
    state dict keeps its keys). Call it before the optimizers take the parameters."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncedBatchNorm):
        like = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        synced = SyncedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, **factory)
        synced.load_state_dict(module.state_dict())
        return synced.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, synced_batch_norm(child))
    return module
