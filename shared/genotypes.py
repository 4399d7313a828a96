"""Typed genotypes for the recurrent (PTB) and convolutional (CIFAR-10) search spaces.

A genotype is the discrete cell a search hands to training: frozen dataclasses of tuples, JSON round-trip, and
validation that names the bad field. Published cells are looked up by name in `GENOTYPES`, never by `eval`.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

from shared.errors import UserFacingError
from shared.registry import Registry

# The op names of each search space, in alpha-column order. The op implementations live in rnn_darts/cnn_darts
# registries; tests check those registries implement exactly these names.
RNN_PRIMITIVES: tuple[str, ...] = ("none", "tanh", "relu", "sigmoid", "identity")
CNN_PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)

Edge = tuple[str, int]  # (op name, index of the input state)


class GenotypeError(UserFacingError, ValueError):
    """A genotype that does not describe a valid cell; the message names the bad field."""


def _edges(value: Any, field: str) -> tuple[Edge, ...]:
    try:
        pairs = [(op, index) for op, index in value]
    except (TypeError, ValueError):
        raise GenotypeError(f"{field} must be a list of [op, input_index] pairs, got {value!r}") from None
    for i, (op, index) in enumerate(pairs):
        if not isinstance(op, str):
            raise GenotypeError(f"{field}[{i}]: the op must be a name (a string), got {op!r}")
        _index(index, f"{field}[{i}]")
    return tuple((op, int(index)) for op, index in pairs)


def _index(value: Any, field: str) -> int:
    """A node index as written: an integer (0.9, true or "1" are refused, not rounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenotypeError(f"{field}: a node index must be an integer, got {value!r}")
    return int(value)


def _check_ops(edges: tuple[Edge, ...], field: str, allowed: tuple[str, ...]) -> None:
    for i, (op, _) in enumerate(edges):
        if op not in allowed or op == "none":
            raise GenotypeError(f"{field}[{i}]: unknown op {op!r}; a genotype op is one of {', '.join(allowed[1:])}")


def _check_concat(concat: tuple[int, ...], field: str, low: int, high: int) -> None:
    if not concat:
        raise GenotypeError(f"{field} is empty: name at least one node to concatenate")
    for i, node in enumerate(concat):
        if not low <= node <= high:
            raise GenotypeError(f"{field}[{i}] = {node} is not a node of this cell ({low}..{high})")


@dataclass(frozen=True)
class RNNGenotype:
    """A recurrent cell: node i (1-based) applies `recurrent[i-1] = (op, j)` to state j (0 = the cell input state)."""

    recurrent: tuple[Edge, ...]
    concat: tuple[int, ...]
    space: ClassVar[str] = "rnn"

    def __post_init__(self) -> None:
        object.__setattr__(self, "recurrent", _edges(self.recurrent, "recurrent"))
        object.__setattr__(self, "concat", tuple(_index(c, "concat") for c in self.concat))
        if not self.recurrent:
            raise GenotypeError("recurrent is empty: a cell needs at least one node")
        _check_ops(self.recurrent, "recurrent", RNN_PRIMITIVES)
        for node, (_, pred) in enumerate(self.recurrent, start=1):
            if not 0 <= pred < node:
                raise GenotypeError(f"recurrent[{node - 1}]: input index {pred} must be in 0..{node - 1} "
                                    f"for node {node}")
        _check_concat(self.concat, "concat", 1, len(self.recurrent))

    @property
    def steps(self) -> int:
        return len(self.recurrent)


@dataclass(frozen=True)
class CNNGenotype:
    """A pair of convolutional cells. Node i (0-based) sums the two edges `normal[2i], normal[2i+1]`; an input index
    of 0 or 1 names the two cell inputs, k >= 2 the intermediate node k-2."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    space: ClassVar[str] = "cnn"

    def __post_init__(self) -> None:
        for cell in ("normal", "reduce"):
            edges = _edges(getattr(self, cell), cell)
            concat = tuple(_index(c, f"{cell}_concat") for c in getattr(self, f"{cell}_concat"))
            object.__setattr__(self, cell, edges)
            object.__setattr__(self, f"{cell}_concat", concat)
            if not edges or len(edges) % 2:
                raise GenotypeError(f"{cell} has {len(edges)} edges: a cell needs two edges per node")
            _check_ops(edges, cell, CNN_PRIMITIVES)
            for k, (_, index) in enumerate(edges):
                if not 0 <= index < k // 2 + 2:
                    raise GenotypeError(f"{cell}[{k}]: input index {index} must be in 0..{k // 2 + 1} "
                                        f"for node {k // 2}")
            _check_concat(concat, f"{cell}_concat", 2, len(edges) // 2 + 1)

    @property
    def steps(self) -> int:
        return len(self.normal) // 2


Genotype = Union[RNNGenotype, CNNGenotype]
_CLASSES: dict[str, type] = {"rnn": RNNGenotype, "cnn": CNNGenotype}


def to_dict(genotype: Genotype) -> dict[str, Any]:
    """Plain JSON-able dict with a `space` tag, so `from_dict` knows which class to build."""
    return {"space": genotype.space, **json.loads(json.dumps(asdict(genotype)))}


def from_dict(data: dict[str, Any]) -> Genotype:
    if not isinstance(data, dict):
        raise GenotypeError(f"a genotype must be a JSON object, got {type(data).__name__}")
    fields = dict(data)
    space = fields.pop("space", None)
    if not isinstance(space, str) or space not in _CLASSES:
        raise GenotypeError(f"space must be one of {', '.join(_CLASSES)}, got {space!r}")
    cls = _CLASSES[space]
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:  # a missing or extra field, or a value of the wrong type
        if isinstance(error, GenotypeError):
            raise
        raise GenotypeError(f"bad {space} genotype fields: {error}") from None


def to_json(genotype: Genotype) -> str:
    return json.dumps(to_dict(genotype))


def from_json(text: str) -> Genotype:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GenotypeError(f"genotype is not valid JSON ({error})") from None
    return from_dict(data)


def load(path: str | Path) -> Genotype:
    """Read a genotype from a `genotype.json` file."""
    try:
        return from_json(Path(path).read_text())
    except OSError as error:
        raise GenotypeError(f"cannot read genotype file {path}: {error.strerror}") from None
    except GenotypeError as error:
        raise GenotypeError(f"genotype file {path}: {error}") from None


GENOTYPES: Registry[Genotype] = Registry("genotype")
_RNN_CONCAT = tuple(range(1, 9))
GENOTYPES.add("rnn/DARTS_V1", RNNGenotype(
    recurrent=(("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3), ("relu", 4), ("identity", 1), ("relu", 5),
               ("relu", 1)),
    concat=_RNN_CONCAT))
GENOTYPES.add("rnn/DARTS_V2", RNNGenotype(
    recurrent=(("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2), ("sigmoid", 5), ("tanh", 3),
               ("relu", 5)),
    concat=_RNN_CONCAT))
GENOTYPES.add("cnn/DARTS_V1", CNNGenotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0), ("max_pool_3x3", 0),
            ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=(2, 3, 4, 5)))
GENOTYPES.add("cnn/DARTS_V2", CNNGenotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1), ("max_pool_3x3", 0),
            ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5)))


def published(space: str, name: str) -> Genotype:
    """A published genotype by space ('rnn' | 'cnn') and name ('DARTS_V1' | 'DARTS_V2')."""
    return GENOTYPES.get(f"{space}/{name}")


def resolve(spec: str | Path, space: str) -> tuple[Genotype, str]:
    """The genotype a training starts from, and where it came from, for `spec` =
    a published name ('DARTS_V2'), a genotype JSON file, or a search run folder (its final `genotype.json`).
    Raises GenotypeError naming the three forms when `spec` is none of them or holds another space's genotype."""
    if f"{space}/{spec}" in GENOTYPES:
        genotype, source = GENOTYPES.get(f"{space}/{spec}"), f"published {space}/{spec}"
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "genotype.json"
            if not path.is_file():
                raise GenotypeError(f"{spec} is a folder without genotype.json: pass a search run folder, a "
                                    f"genotype JSON file or a published name ({_names(space)})")
        elif not path.is_file():
            raise GenotypeError(f"genotype {str(spec)!r} is not a published name ({_names(space)}), a genotype JSON "
                                f"file or a search run folder")
        genotype, source = load(path), str(path)
    if genotype.space != space:
        raise GenotypeError(f"{source} holds a {genotype.space} genotype; this training needs a {space} one")
    return genotype, source


def _names(space: str) -> str:
    return ", ".join(name.split("/", 1)[1] for name in GENOTYPES.names() if name.startswith(f"{space}/"))
