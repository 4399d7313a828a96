"""Resolve the compute device once; everything else receives a `torch.device`."""
from __future__ import annotations

import torch

from shared.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu' and 'cuda[:N]' are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or name.startswith("cuda"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
        return torch.device(name)
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
