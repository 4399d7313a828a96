"""Genotypes: JSON round trip, published cells, validation that names the bad field."""
from __future__ import annotations

import pytest

from shared import genotypes as g
from shared.genotypes import CNNGenotype, GenotypeError, RNNGenotype


@pytest.mark.parametrize("name", g.GENOTYPES.names())
def test_published_genotypes_round_trip_through_json(name: str, tmp_path) -> None:
    genotype = g.GENOTYPES.get(name)
    assert g.from_json(g.to_json(genotype)) == genotype
    path = tmp_path / "genotype.json"
    path.write_text(g.to_json(genotype))
    assert g.load(path) == genotype


def test_darts_v2_recurrent_cell_is_the_published_one() -> None:
    v2 = g.published("rnn", "DARTS_V2")
    assert v2.recurrent == (("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2), ("sigmoid", 5),
                            ("tanh", 3), ("relu", 5))
    assert v2.concat == tuple(range(1, 9))
    cnn = g.published("cnn", "DARTS_V2")
    assert cnn.normal_concat == (2, 3, 4, 5) and cnn.steps == 4
    assert sum(op == "sep_conv_3x3" for op, _ in cnn.normal) == 5


def test_lists_from_json_become_tuples_and_stay_hashable() -> None:
    genotype = RNNGenotype(recurrent=[["tanh", 0], ["relu", 1]], concat=[1, 2])
    assert genotype.recurrent == (("tanh", 0), ("relu", 1))
    assert hash(genotype) == hash(RNNGenotype(recurrent=(("tanh", 0), ("relu", 1)), concat=(1, 2)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(recurrent=[("tanh", 0), ("swish", 1)], concat=[1, 2]), r"recurrent\[1\]: unknown op 'swish'"),
    (dict(recurrent=[("tanh", 0), ("none", 0)], concat=[1, 2]), r"recurrent\[1\]: unknown op 'none'"),
    (dict(recurrent=[("tanh", 0), ("relu", 2)], concat=[1, 2]), r"recurrent\[1\]: input index 2 must be in 0..1"),
    (dict(recurrent=[("tanh", 0)], concat=[1, 2]), r"concat\[1\] = 2 is not a node"),
    (dict(recurrent=[("tanh", 0)], concat=[]), r"concat is empty"),
    (dict(recurrent=[], concat=[1]), r"recurrent is empty"),
    (dict(recurrent=[("tanh",)], concat=[1]), r"recurrent must be a list of \[op, input_index\] pairs"),
])
def test_bad_rnn_genotypes_name_the_field(kwargs, message) -> None:
    with pytest.raises(GenotypeError, match=message):
        RNNGenotype(**kwargs)


def _cnn(**changes):
    fields = g.to_dict(g.published("cnn", "DARTS_V1"))
    fields.pop("space")
    fields.update(changes)
    return CNNGenotype(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(normal=[("sep_conv_9x9", 0), ("skip_connect", 1)]), r"normal\[0\]: unknown op 'sep_conv_9x9'"),
    (dict(reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 2)]), r"reduce\[1\]: input index 2 must be in 0..1"),
    (dict(normal=[("skip_connect", 0)]), r"normal has 1 edges"),
    (dict(reduce_concat=[2, 3, 9]), r"reduce_concat\[2\] = 9 is not a node"),
])
def test_bad_cnn_genotypes_name_the_field(changes, message) -> None:
    with pytest.raises(GenotypeError, match=message):
        _cnn(**changes)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"space": "gnn"}', "space must be one of"),
    ('{"space": "rnn", "recurrent": [["tanh", 0]]}', "bad rnn genotype fields"),
    ('{"space": ["rnn"], "recurrent": [["tanh", 0]], "concat": [1]}', "space must be one of"),
    ('{"space": "rnn", "recurrent": [["tanh", 0]], "concat": "x"}', "concat: a node index must be an integer"),
    # Values are refused, never coerced: 0.9 is not node 0, true is not node 1, "1" is not a number.
    ('{"space": "rnn", "recurrent": [["tanh", 0.9]], "concat": [1]}', r"recurrent\[0\]: a node index must be an"),
    ('{"space": "rnn", "recurrent": [["tanh", true]], "concat": [1]}', r"recurrent\[0\]: a node index must be an"),
    ('{"space": "rnn", "recurrent": [["tanh", "0"]], "concat": [1]}', r"recurrent\[0\]: a node index must be an"),
    ('{"space": "rnn", "recurrent": [["tanh", 0]], "concat": [1.0]}', "concat: a node index must be an integer"),
    ('{"space": "rnn", "recurrent": [[3, 0]], "concat": [1]}', r"recurrent\[0\]: the op must be a name"),
])
def test_bad_json_raises_clear_errors(text: str, message: str) -> None:
    with pytest.raises(GenotypeError, match=message):
        g.from_json(text)


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(GenotypeError, match="cannot read genotype file"):
        g.load("/nonexistent/genotype.json")
    with pytest.raises(KeyError, match="unknown genotype 'rnn/DARTS_V9'"):
        g.published("rnn", "DARTS_V9")


def test_resolve_a_published_name_a_json_file_and_a_search_run_folder(tmp_path) -> None:
    resolve = g.resolve

    genotype, source = resolve("DARTS_V2", "rnn")
    assert genotype == g.published("rnn", "DARTS_V2") and source == "published rnn/DARTS_V2"
    mine = g.published("rnn", "DARTS_V1")
    (tmp_path / "g.json").write_text(g.to_json(mine))
    assert resolve(tmp_path / "g.json", "rnn") == (mine, str(tmp_path / "g.json"))
    run = tmp_path / "runs" / "7"
    run.mkdir(parents=True)
    (run / "genotype.json").write_text(g.to_json(mine))
    assert resolve(str(run), "rnn") == (mine, str(run / "genotype.json"))


@pytest.mark.parametrize("spec, space, message", [
    ("DARTS_V9", "rnn", "is not a published name (DARTS_V1, DARTS_V2), a genotype JSON file or a search run folder"),
    ("{folder}", "rnn", "is a folder without genotype.json"),
    ("DARTS_V2", "cnn", None),  # the cnn DARTS_V2 resolves; the rnn-in-cnn case is the file below
    ("{rnn_file}", "cnn", "holds a rnn genotype; this training needs a cnn one"),
])
def test_resolve_errors_name_the_problem(tmp_path, spec: str, space: str, message: str | None) -> None:
    resolve = g.resolve

    (tmp_path / "rnn.json").write_text(g.to_json(g.published("rnn", "DARTS_V2")))
    spec = spec.format(folder=tmp_path, rnn_file=tmp_path / "rnn.json")
    if message is None:
        assert resolve(spec, space)[0].space == space
        return
    with pytest.raises(GenotypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(spec, space)
