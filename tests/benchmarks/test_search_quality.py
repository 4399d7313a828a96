"""The search-quality benchmark on a tiny generated corpus: every order's curve, genotypes and baselines in JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import search_quality
from tests.rnn_darts.test_search import write_corpus


def test_benchmark_writes_a_curve_per_order(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    result = search_quality.main(["--data-dir", str(write_corpus(tmp_path / "corpus")), "--steps", "5",
                                  "--eval-every", "2", "--batch", "4", "--eval-tokens", "60", "--eval-batch", "3",
                                  "--threads", "1",
                                  "--set", "ninp=8", "nhid=8", "steps=2", "decoder_bias=unigram",
                                  "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(result["orders"]) == ["plain", "first", "second"]
    assert result["unigram_valid_ppl"] > 1 and result["unigram_eval_ppl"] > 1
    for order, figures in result["orders"].items():
        curve = figures["curve"]
        assert [point["step"] for point in curve] == [0, 2, 4, 5], order
        assert curve[0]["train_loss"] is None and all(point["train_loss"] > 0 for point in curve[1:])
        assert all(point["valid_ppl"] > 1 and 0 <= point["identity_share"] <= 1 for point in curve)
        assert figures["final_genotype"] == curve[-1]["genotype"] and figures["seconds_per_step"] > 0
    assert result["orders"]["plain"]["final_genotype"] == result["orders"]["plain"]["curve"][0]["genotype"]
    assert result["config"]["set"] == ["ninp=8", "nhid=8", "steps=2", "decoder_bias=unigram"]


def test_a_key_of_no_config_or_of_the_benchmark_is_refused() -> None:
    with pytest.raises(SystemExit, match="'lr' is no field"):
        search_quality.main(["--set", "lr=3"])
    with pytest.raises(SystemExit, match="batch_size is the benchmark's own"):
        search_quality.main(["--set", "batch_size=3"])
