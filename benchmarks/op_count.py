"""How many aten operators a step dispatches: the launch count a GPU would pay, measured on any device.

Every operator the dispatcher runs in a step (forward, backward, optimizer) passes through a `TorchDispatchMode`;
`launches` leaves out the views (`view`, `permute`, `select`, `detach`, ...: they share their input's memory and run
no kernel) and the operators that only allocate or alias (`NO_KERNEL`), `ops` counts them too (each still costs the
CPU a dispatch). Counts are exact and the same on every run
of one step, machine and torch version, so a change's effect on them needs no repeated rounds.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode


# Not views by their schema, but they run no kernel: allocation only, or an alias (what matmul's reshapes use).
NO_KERNEL = frozenset(f"aten.{name}" for name in ("empty", "empty_like", "empty_strided", "new_empty",
                                                  "new_empty_strided", "_unsafe_view", "lift_fresh"))


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, by name, and those that launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.launches = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        self.by_name[name] += 1
        self.launches += not (func.is_view or name in NO_KERNEL)
        return func(*args, **(kwargs or {}))

    def figures(self, top: int = 12) -> dict[str, Any]:
        return {"ops": sum(self.by_name.values()), "launches": self.launches,
                "most_common": dict(self.by_name.most_common(top))}


def count_ops(step: Callable[[], None]) -> dict[str, Any]:
    """The operators one call of `step` dispatches (see `OpCounter.figures`)."""
    with OpCounter() as counter:
        step()
    return counter.figures()
