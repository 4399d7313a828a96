"""Tests for rnn_darts.data: corpus loading and its errors, vocabulary, batching and BPTT windows.

Small corpora are written into tmp_path by each test; the real-PTB tests run only where the data exists.
"""
from __future__ import annotations

import collections
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from rnn_darts import data
from rnn_darts.data import (
    VocabularyConfig,
    EOS,
    UNK,
    batchify,
    bptt_windows,
    get_batch,
    load_corpus,
    load_tokenizer,
    resolve_data_dir,
    save_tokenizer,
    unigram_perplexity,
)
from shared.errors import ConfigError, DataError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then", "slept", UNK]


def _sentences(seed: int, n_lines: int, words: list[str]) -> str:
    rng = random.Random(seed)
    lines = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + " " for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    """Write a three-file corpus in the PTB layout and return its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("ptb.train.txt", train), ("ptb.valid.txt", valid), ("ptb.test.txt", test)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def ptb_tokens(text: str) -> list[str]:
    """The reference tokenization: one <eos> per line end, whitespace-split words."""
    return text.replace("\n", f" {EOS} ").split()


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    # The train split uses every word, so valid and test are fully in-vocabulary; ~40 lines, a few hundred words.
    texts = {"train": " " + " ".join(WORDS) + "\n" + _sentences(0, 40, WORDS),
             "valid": _sentences(1, 10, WORDS), "test": _sentences(2, 12, WORDS)}
    return write_corpus(tmp_path / "ptb", **texts), texts


# ---- vocabulary and counts ------------------------------------------------------------------------------------

def test_vocabulary_and_token_counts_include_eos(small: tuple[Path, dict[str, str]]) -> None:
    folder, texts = small
    corpus = load_corpus(folder)
    assert corpus.ntoken == len(set(WORDS)) + 1  # + <eos>
    assert corpus.source == str(folder)
    for split, text in texts.items():
        ids = getattr(corpus, split)
        assert ids.dtype == torch.int64 and ids.dim() == 1
        # Decoding id by id must give back exactly the reference token stream, <eos> included.
        assert [corpus.tokenizer.id_to_token(i) for i in ids.tolist()] == ptb_tokens(text)


def test_every_line_ends_in_eos(small: tuple[Path, dict[str, str]]) -> None:
    corpus = load_corpus(small[0])
    assert corpus.tokenizer.encode("the cat").tokens == ["the", "cat", EOS]
    assert corpus.tokenizer.encode("  the   cat\t").tokens == ["the", "cat", EOS]


def test_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path, train=f"a b {UNK}\nb\n", valid="a zebra\n", test="yak b\n")
    corpus = load_corpus(folder)
    vocab = corpus.tokenizer.get_vocab()
    assert set(vocab) == {"a", "b", UNK, EOS}
    unk, eos = vocab[UNK], vocab[EOS]
    assert corpus.valid.tolist() == [vocab["a"], unk, eos]
    assert corpus.test.tolist() == [unk, vocab["b"], eos]


def test_words_train_lacks_become_an_appended_unk_and_their_share_is_counted(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path, train="a b b\nb a\n", valid="a zebra\n", test="a b\nb yak gnu a\n")
    corpus = load_corpus(folder)
    vocab = corpus.tokenizer.get_vocab()
    assert vocab == {EOS: 0, "b": 1, "a": 2, UNK: 3}  # the training ids as before, <unk> last
    assert corpus.valid.tolist() == [2, 3, 0]
    assert corpus.test.tolist() == [2, 1, 0, 1, 3, 3, 2, 0]
    assert corpus.oov == {"train": 0.0, "valid": 1 / 2, "test": 2 / 6}  # words, not <eos>


def test_a_corpus_every_word_of_which_train_has_gets_no_unk(small: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    folder = write_corpus(tmp_path, train="a b\nb a\n", valid="a b\n", test="b\n")
    corpus = load_corpus(folder)
    assert UNK not in corpus.tokenizer.get_vocab() and set(corpus.oov.values()) == {0.0}


def test_vocab_size_and_min_frequency_cap_the_training_words(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path, train="a a a a b b b c c d\n", valid="a d e\n", test="c\n")
    capped = load_corpus(folder, VocabularyConfig(vocab_size=2))
    assert capped.tokenizer.get_vocab() == {EOS: 0, "a": 1, "b": 2, UNK: 3}
    assert capped.oov == {"train": 3 / 10, "valid": 2 / 3, "test": 1.0}
    frequent = load_corpus(folder, VocabularyConfig(min_frequency=2))
    assert set(frequent.tokenizer.get_vocab()) == {EOS, "a", "b", "c", UNK}
    assert frequent.valid.tolist() == [frequent.tokenizer.token_to_id(t) for t in ("a", UNK, UNK, EOS)]


@pytest.mark.parametrize(("values", "message"), [({"vocab_size": 0}, "vocab_size must be a positive number"),
                                                 ({"min_frequency": 0}, "min_frequency must be >= 1"),
                                                 ({"vocab_size": 2.5}, "vocab_size must be an integer or None")])
def test_bad_vocabulary_caps_are_one_line(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        VocabularyConfig(**values)


def test_tokenizer_round_trips_through_json(small: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    corpus = load_corpus(small[0])
    path = save_tokenizer(corpus, tmp_path / "artifacts" / "tokenizer.json")
    restored = load_tokenizer(path)
    lines = small[1]["valid"].splitlines()
    restored_ids = [i for enc in restored.encode_batch(lines) for i in enc.ids]
    assert restored_ids == corpus.valid.tolist()


def test_load_tokenizer_rejects_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a tokenizer JSON"):
        load_tokenizer(bad)


def test_unigram_perplexity_matches_closed_form(small: tuple[Path, dict[str, str]]) -> None:
    _, texts = small
    counts = collections.Counter(ptb_tokens(texts["train"]))
    total = sum(counts.values())
    valid = ptb_tokens(texts["valid"])
    expected = math.exp(-sum(math.log(counts[w] / total) for w in valid) / len(valid))
    assert unigram_perplexity(load_corpus(small[0])) == pytest.approx(expected, rel=1e-12)


# ---- where the data comes from ---------------------------------------------------------------------------------

def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DARTS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None).resolve() == (tmp_path / "data" / "ptb").resolve()
    monkeypatch.setenv("DARTS_DATA_DIR", str(tmp_path / "root"))
    assert resolve_data_dir(None) == tmp_path / "root" / "ptb"
    write_corpus(tmp_path / "root", "a\n", "a\n", "a\n")
    assert resolve_data_dir(None) == tmp_path / "root"  # the env folder itself holds the files
    assert resolve_data_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_missing_folder_offline_names_both_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    missing = tmp_path / "nowhere" / "ptb"
    with pytest.raises(DataError) as info:
        load_corpus(missing)
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message
    assert "DARTS_DATA_DIR" in message and "ptb.train.txt" in message  # remedy 1: a local folder
    assert "go online" in message and "Hugging Face hub" in message  # remedy 2: the download


def test_missing_folder_hub_failure_names_both_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(DataError, match=r"DARTS_DATA_DIR.*go online.*Name or service not known"):
        load_corpus(tmp_path / "nowhere")


def test_the_hub_copy_is_read_from_its_parquet_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real `datasets` loader, on a small stored copy in the layout of the hub's refs/convert/parquet
    branch (config penn_treebank, a folder per split); only the network probe is stubbed."""
    import datasets
    import huggingface_hub

    assert data.HUB_PARQUET == "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank"
    lines = {"train": [" a b ", " b c "], "validation": [" c "], "test": [" a ", " b "]}
    for split, sentences in lines.items():
        (tmp_path / "hub" / split).mkdir(parents=True)
        datasets.Dataset.from_dict({"sentence": sentences}).to_parquet(tmp_path / "hub" / split / "0000.parquet")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: None)
    monkeypatch.setattr(data, "HUB_PARQUET", str(tmp_path / "hub"))
    corpus = load_corpus(tmp_path / "nowhere")
    assert corpus.source.endswith(data.HUB_ID)
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [6, 2, 4]  # words and <eos> per line
    assert corpus.tokenizer.id_to_token(int(corpus.valid[0])) == "c"


def test_plain_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "ptb"
    path.write_text("a b\n", encoding="utf-8")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_corpus(path)


# ---- malformed corpora -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"])
def test_missing_split_file_is_named(small: tuple[Path, dict[str, str]], name: str) -> None:
    folder, _ = small
    (folder / name).unlink()
    with pytest.raises(DataError, match=rf"has no {name}"):
        load_corpus(folder)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["zero-bytes", "blank-lines"])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_empty_split_is_named(small: tuple[Path, dict[str, str]], split: str, content: str) -> None:
    folder, _ = small
    (folder / f"ptb.{split}.txt").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"the {split} split \(.*ptb\.{split}\.txt\) holds no words"):
        load_corpus(folder)


def test_non_utf8_file_is_named(small: tuple[Path, dict[str, str]]) -> None:
    folder, _ = small
    (folder / "ptb.test.txt").write_bytes("the caf\u00e9 sat\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"ptb\.test\.txt is not UTF-8"):
        load_corpus(folder)


def test_other_corpus_with_same_layout(tmp_path: Path) -> None:
    # A non-PTB text (no <unk>, other words, capitals and punctuation) loads the same way.
    words = ["Hello,", "world!", "Über", "naïve", "x-ray", "42"]
    folder = write_corpus(tmp_path, _sentences(3, 20, words), _sentences(4, 5, words), _sentences(5, 5, words))
    corpus = load_corpus(folder)
    assert corpus.ntoken == len(words) + 1
    assert corpus.tokenizer.encode("Über 42").tokens == ["Über", "42", EOS]


# ---- batching --------------------------------------------------------------------------------------------------

def test_batchify_columns_are_contiguous_and_tail_trimmed() -> None:
    source = batchify(torch.arange(26), 4)
    assert source.shape == (6, 4)
    for b in range(4):
        assert source[:, b].tolist() == list(range(6 * b, 6 * b + 6))
    assert batchify(torch.arange(26), 4, device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("batch_size", [0, -1, 27])
def test_batchify_rejects_batch_sizes_that_do_not_fit(batch_size: int) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        batchify(torch.arange(26), batch_size)


def test_get_batch_targets_are_inputs_shifted_by_one() -> None:
    source = batchify(torch.arange(26), 4)  # (6, 4)
    x, y = get_batch(source, 1, 2)
    assert x.tolist() == [[1, 7, 13, 19], [2, 8, 14, 20]]
    assert y.tolist() == [[2, 8, 14, 20], [3, 9, 15, 21]]
    x, y = get_batch(source, 3, 10)  # clipped: only rows 3, 4 have a next row
    assert x.shape == y.shape == (2, 4)
    assert torch.equal(y, x + 1)
    with pytest.raises(IndexError):
        get_batch(source, 5, 1)  # the last row has no target


def test_windows_cover_every_step_once_and_fit_get_batch() -> None:
    source = batchify(torch.arange(4 * 500), 4)  # (500, 4)
    n_steps = source.size(0) - 1
    for vary in (True, False):
        windows = list(bptt_windows(n_steps, 35, torch.Generator().manual_seed(0), vary=vary))
        covered = [t for start, seq_len in windows for t in range(start, start + seq_len)]
        assert covered == list(range(n_steps))
        for start, seq_len in windows:
            x, y = get_batch(source, start, seq_len)
            assert x.size(0) == seq_len and torch.equal(y, x + 1)
    fixed = list(bptt_windows(n_steps, 35, torch.Generator(), vary=False))
    assert [s for _, s in fixed] == [35] * 14 + [499 - 14 * 35]


def test_windows_are_reproducible_from_generator_state() -> None:
    gen = torch.Generator().manual_seed(1234)
    state = gen.get_state()
    first = list(bptt_windows(2000, 35, gen))
    second = list(bptt_windows(2000, 35, gen))
    assert first != second  # the generator advanced
    gen.set_state(state)
    assert list(bptt_windows(2000, 35, gen)) == first
    assert list(bptt_windows(2000, 35, torch.Generator().manual_seed(1234))) == first


def _normal_cdf(x: float, mean: float, std: float) -> float:
    return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))


def _awd_cdf(x: float, bptt: int) -> float:
    """P(Normal(base, 5) < x) for base = bptt w.p. 0.95, bptt / 2 w.p. 0.05."""
    return 0.95 * _normal_cdf(x, bptt, 5.0) + 0.05 * _normal_cdf(x, bptt / 2, 5.0)


def test_window_lengths_follow_awd_lstm_distribution() -> None:
    bptt, max_extra = 35, 2
    lengths = [s for _, s in bptt_windows(200_000, bptt, torch.Generator().manual_seed(0), max_extra=max_extra)]
    body = lengths[:-1]  # the last window is clipped
    assert min(body) >= 5 and max(body) == bptt + max_extra
    n = len(body)
    # int() truncates toward zero, so seq_len <= 26 exactly when the normal draw is < 27; with 5.7k windows the
    # standard error of these fractions is about 0.006.
    short = sum(s <= 26 for s in body) / n  # mostly the bptt/2 branch
    assert short == pytest.approx(_awd_cdf(27.0, bptt), abs=0.02)
    capped = sum(s == bptt + max_extra for s in body) / n  # every draw >= 37 lands on the cap
    assert capped == pytest.approx(1.0 - _awd_cdf(37.0, bptt), abs=0.02)


def test_windows_without_spread_are_the_original_search_lengths() -> None:
    """spread=0: bptt, or int(bptt / 2) one time in twenty, as the original train_search.py."""
    lengths = [s for _, s in bptt_windows(100_000, 35, torch.Generator().manual_seed(0), spread=0.0)][:-1]
    assert set(lengths) == {35, 17}
    assert lengths.count(17) / len(lengths) == pytest.approx(0.05, abs=0.015)  # ~2,900 windows: s.e. 0.004


def test_windows_reject_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="bptt"):
        list(bptt_windows(10, 0, torch.Generator()))
    with pytest.raises(ConfigError, match="spread"):
        list(bptt_windows(10, 5, torch.Generator(), spread=-1.0))
    assert list(bptt_windows(0, 35, torch.Generator())) == []


# ---- real Penn Treebank ----------------------------------------------------------------------------------------

def _real_ptb_dir() -> Path:
    env = os.environ.get("DARTS_TEST_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return root / "ptb"


@pytest.fixture(scope="module")
def real_corpus() -> data.Corpus:
    folder = _real_ptb_dir()
    if not (folder / "ptb.train.txt").is_file():
        pytest.skip(f"real PTB not found at {folder} (set DARTS_TEST_DATA)")
    return load_corpus(folder)


@pytest.mark.real_data
def test_real_ptb_vocabulary_and_counts(real_corpus: data.Corpus) -> None:
    assert real_corpus.ntoken == 10000
    assert (len(real_corpus.train), len(real_corpus.valid), len(real_corpus.test)) == (929_589, 73_760, 82_430)
    assert {UNK, EOS} <= set(real_corpus.tokenizer.get_vocab())
    # PTB has its own <unk>: its words and ids are those of every earlier version, and nothing is out of vocabulary.
    assert data.vocabulary_fingerprint(real_corpus) == "10000 words, sha256 6e847ddc08ea"
    assert real_corpus.oov == {"train": 0.0, "valid": 0.0, "test": 0.0}


@pytest.mark.real_data
def test_real_ptb_unigram_perplexity(real_corpus: data.Corpus) -> None:
    assert 680.0 <= unigram_perplexity(real_corpus) <= 695.0
