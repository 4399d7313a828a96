"""`compile=MODE`: the model's fixed-shape units compiled with torch.compile (docs/engine.md).

A model names its units in `compile_cells(mode)` (the recurrent cell's time step, each convolutional cell) and
compiles each with `compile_unit`; a model without it is compiled whole. Compiled graphs have no double backward,
so the exact order is refused and the collapse measurement runs eager (`eager`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn

from shared.errors import ConfigError
from shared.sync_batch_norm import SyncedBatchNorm
from shared.validation import check_choice

# off, or torch.compile's mode; the modes that replay CUDA graphs (on a GPU) are CUDA_GRAPH_MODES
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# A unit compiles apart for each kind of pass (which of weights and alphas need gradients), for evaluation, each batch
# size and, where several cells share one forward, each cell shape: the PTB smoke compiles its time step in 10
# variants, past torch's default limit of 8, beyond which the rest would run eager.
RECOMPILE_LIMIT = 128


def check_compile(order: str, compile: str) -> None:
    """`compile` is one of COMPILE_MODES and, unless off, the order needs no double backward (nor a torch without
    the eager stance the collapse measurement needs)."""
    check_choice("compile", compile, COMPILE_MODES)
    if compile != "off" and order == "exact":
        raise ConfigError(f"compile={compile} cannot run order=exact: compiled graphs have no double backward; "
                          "use order=second or compile=off")
    if compile != "off" and not hasattr(torch.compiler, "set_stance"):
        raise ConfigError(f"compile needs torch 2.6 or later (this is {torch.__version__}): upgrade torch or set "
                          "compile=off")


def compile_model(model: nn.Module, mode: str) -> None:
    """Compile `model` in place with torch.compile's `mode`: its `compile_cells` where it has one, else its forward."""
    if any(isinstance(m, SyncedBatchNorm) for m in model.modules()):
        raise ConfigError("compile does not run with sync_batch_norm=True (an all-reduce inside a compiled cell is "
                          "untested): set compile=off or sync_batch_norm=False")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    follow_cpu_capability()
    if hasattr(model, "compile_cells"):
        model.compile_cells(mode)
    else:
        model.forward = compile_unit(model.forward, mode)


def follow_cpu_capability() -> None:
    """Inductor's CPU code for the ATen CPU capability this process runs with (the vector width), stated in its
    config so that its graph cache keys on it: a graph compiled under AVX-512 and loaded under
    ATEN_CPU_CAPABILITY=avx2 made the first step NaN (torch 2.13; fine with a fresh cache or the graph cache off)."""
    width = {"AVX512": 512, "AVX2": 256}.get(torch.backends.cpu.get_cpu_capability())
    if width is not None:
        from torch._inductor import config

        config.cpp.simdlen = width


def compile_unit(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """`fn` compiled by torch.compile in `mode`. In a mode that replays CUDA graphs, calls without autograd
    (evaluation, rewards) run `fn` eager: each replay with no backward pending starts a new iteration that frees the
    last one's outputs, and those calls keep outputs across calls (a window's time steps, the earlier cells' states)."""
    compiled = torch.compile(fn, mode=mode)
    if mode not in CUDA_GRAPH_MODES:
        return compiled

    def run(*args: Any, **kwargs: Any) -> Any:
        return (compiled if torch.is_grad_enabled() else fn)(*args, **kwargs)

    return run


def eager(compiled: bool) -> AbstractContextManager[Any]:
    """Run the block eager when the model is compiled (a double backward), else change nothing."""
    return torch.compiler.set_stance("force_eager") if compiled else nullcontext()
