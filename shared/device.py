"""Resolve the compute device once; everything else receives a `torch.device`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shared.distributed import launched
from shared.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu' and 'cuda[:N]' are taken as given, except that each process
    torchrun starts takes its own GPU (cuda:LOCAL_RANK) for 'auto' and 'cuda'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name.startswith("cuda"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
        device, processes = torch.device(name), launched()
        if device.type == "cuda" and processes.several:
            return process_gpu(device, processes.local_rank)
        return device
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")


def process_gpu(device: torch.device, local_rank: int) -> torch.device:
    """The GPU of the process torchrun started as LOCAL_RANK on its machine: one per process."""
    if device.index is not None:
        raise ConfigError(f"device={device} under torchrun would put every process on one GPU: pass device=cuda (or "
                          f"auto), and each process takes its own (cuda:LOCAL_RANK)")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs: start at "
                          f"most that many processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate: CUDA's free memory, on the CPU the kernel's MemAvailable; None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(build: Callable[[], nn.Module], device: torch.device, sizes: str, copies: int = 4) -> None:
    """One line unless `copies` times the parameters of the model `build()` makes (weights, gradients, optimizer
    state) fit the device's free memory. The model is built on the meta device, which allocates nothing, so a
    size typo fails here instead of in a hundred-gigabyte allocation; `sizes` names the keys that set its size."""
    with torch.device("meta"):
        model = build()
    count = sum(p.numel() for p in model.parameters())
    need = copies * sum(p.numel() * p.element_size() for p in model.parameters())
    free = free_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"the model has {count:,} parameters, about {need / 2**30:.1f} GiB with gradients and "
                          f"optimizer state, more than the {free / 2**30:.1f} GiB free on {device}: lower {sizes}")
