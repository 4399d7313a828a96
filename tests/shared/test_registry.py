import pytest

from shared.registry import Registry


def test_registry_adds_looks_up_and_rejects_duplicates() -> None:
    ops = Registry[int]("op")
    ops.add("a", 1)

    @ops.register("b")
    def b() -> int:
        return 2

    assert ops.get("a") == 1 and ops.get("b") is b and ops.names() == ("a", "b") and "a" in ops and len(ops) == 2
    with pytest.raises(KeyError, match="duplicate op name 'a'"):
        ops.add("a", 3)
    with pytest.raises(KeyError, match="unknown op 'c'; known: a, b"):
        ops.get("c")
