"""How many aten operators a step dispatches: the launch count a GPU would pay, measured on any device.

Every operator the dispatcher runs in a step (forward, backward, optimizer) passes through a `TorchDispatchMode`;
`launches` leaves out the views (`view`, `permute`, `select`, `detach`, ...: they share their input's memory and run
no kernel), `ops` counts them too (each still costs the CPU a dispatch). Counts are exact and the same on every run
of one step, machine and torch version, so a change's effect on them needs no repeated rounds.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, by name; `views` the subset that are views."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.by_name[str(func.overloadpacket)] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))

    def figures(self, top: int = 12) -> dict[str, Any]:
        ops = sum(self.by_name.values())
        return {"ops": ops, "launches": ops - self.views, "most_common": dict(self.by_name.most_common(top))}


def count_ops(step: Callable[[], None]) -> dict[str, Any]:
    """The operators one call of `step` dispatches (see `OpCounter.figures`)."""
    with OpCounter() as counter:
        step()
    return counter.figures()
