"""Penn Treebank for the word-level language-model search: loading, vocabulary and BPTT batching.

The corpus is Mikolov's word-level PTB (ptb.train.txt, ptb.valid.txt, ptb.test.txt, one sentence per line);
any plain-text corpus with the same three-file layout works too. Text is read through `datasets`, the vocabulary
is a `tokenizers` WordLevel model trained on the training split, and every line ends in `<eos>`.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import Counter
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from shared import distributed
from shared.errors import CheckpointError, ConfigError, DataError
from shared.hub import data_folder, load_hub_dataset, offline_reason, one_line, quiet_progress_bars
from shared.validation import check_fields

logger = logging.getLogger(__name__)

SPLIT_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
EOS = "<eos>"
UNK = "<unk>"
HUB_ID = "ptb-text-only/ptb_text_only"  # Hugging Face hub copy of the same Mikolov text
# Its loading script no longer runs in `datasets` (4.0 dropped scripts): read the hub's Parquet conversion of the
# script's output instead (branch refs/convert/parquet, config penn_treebank, a folder per split).
HUB_PARQUET = f"hf://datasets/{HUB_ID}@refs%2Fconvert%2Fparquet/penn_treebank"
HUB_COLUMN = "sentence"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_UNBOUNDED_VOCAB = 2**31 - 1  # the corpus decides the vocabulary (10k on PTB), not the trainer


@dataclass(frozen=True)
class VocabularyConfig:
    """Which training words get an id of their own (as fairseq's and torchtext's caps); every other word, and every
    word of valid or test that train lacks, is read as <unk>, which joins the vocabulary when the text has none."""

    vocab_size: int | None = None  # keep the N most frequent training words (<eos> and an appended <unk> extra)
    min_frequency: int = 1  # keep only training words seen at least this often

    def __post_init__(self) -> None:
        check_fields(self)
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size must be a positive number of words or None (all), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ConfigError(f"min_frequency must be >= 1, got {self.min_frequency}")


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Corpus:
    """A tokenized corpus: the tokenizer and three 1-D int64 tensors of token ids (each line ends in <eos>)."""

    tokenizer: Tokenizer
    train: torch.Tensor  # (N_train,)
    valid: torch.Tensor  # (N_valid,)
    test: torch.Tensor  # (N_test,)
    source: str  # the folder it was read from, or the hub dataset
    oov: dict[str, float] = field(default_factory=dict)  # per split: the share of its words read as <unk>

    @property
    def ntoken(self) -> int:
        """Vocabulary size: the number of rows of the embedding and of the decoder output."""
        return self.tokenizer.get_vocab_size()


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """Where the corpus lives: `data_dir` if given; else $DARTS_DATA_DIR (or its `ptb/`); else ./data/ptb."""
    return data_folder(data_dir, "ptb", lambda root: (root / SPLIT_FILES["train"]).is_file())


def load_corpus(data_dir: str | Path | None = None, vocabulary: VocabularyConfig = VocabularyConfig()) -> Corpus:
    """Load and tokenize the corpus from a local folder, or from the Hugging Face hub when the folder is absent.

    The vocabulary is the training split's words (`vocabulary` caps them); words outside it are read as <unk>
    (`Corpus.oov` gives their share per split). Raises `DataError` for a missing corpus, a missing or empty split
    or non-UTF-8 text.
    """
    start = time.perf_counter()
    folder = resolve_data_dir(data_dir)
    if folder.is_dir():
        lines, names = _read_local(folder), {s: str(folder / f) for s, f in SPLIT_FILES.items()}
        source = str(folder)
    elif folder.exists():
        raise DataError(f"{folder} is a file, not a folder: point data_dir or DARTS_DATA_DIR at the folder "
                        "that holds ptb.train.txt, ptb.valid.txt and ptb.test.txt")
    else:
        lines, source = _read_hub(folder), f"hf://datasets/{HUB_ID}"
        names = {s: f"{source} split {h!r}" for s, h in HUB_SPLITS.items()}
    corpus = _build_corpus(lines, names, source, vocabulary)
    logger.info("loaded %s in %.1f s: %d word types; train/valid/test %d/%d/%d tokens; out of vocabulary (read as "
                "%s): %s", source, time.perf_counter() - start, corpus.ntoken, len(corpus.train), len(corpus.valid),
                len(corpus.test), UNK, ", ".join(f"{split} {rate:.2%}" for split, rate in corpus.oov.items()))
    return corpus


def synthetic_corpus(ntoken: int, tokens: int, seed: int = 0) -> Corpus:
    """Uniformly random ids over a vocabulary w0..w{ntoken-1} (w0 = <eos>): a corpus of the real shape for
    benchmarks and tests; each split holds `tokens` ids."""
    tokenizer = Tokenizer(models.WordLevel({EOS if i == 0 else f"w{i}": i for i in range(ntoken)}, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    generator = torch.Generator().manual_seed(seed)
    train, valid, test = (torch.randint(ntoken, (tokens,), generator=generator) for _ in range(3))
    return Corpus(tokenizer, train, valid, test, source=f"synthetic:{ntoken}x{tokens}")


def vocabulary_fingerprint(corpus: Corpus) -> str:
    """'<N> words, sha256 <first 12 hex digits>' of the vocabulary in id order: what a resumed run must share."""
    vocab = corpus.tokenizer.get_vocab()
    words = "\n".join(sorted(vocab, key=vocab.get))
    return f"{len(vocab)} words, sha256 {hashlib.sha256(words.encode()).hexdigest()[:12]}"


def check_vocabulary(saved: str | None, current: str) -> None:
    """One line unless a checkpoint's vocabulary fingerprint (None: a checkpoint from before the check) is the
    current corpus's."""
    if saved is not None and saved != current:
        raise CheckpointError(f"resume: the checkpoint's vocabulary ({saved}) is not this corpus's ({current}): "
                              f"word ids would mean other words; resume with the data_dir the run used")


def save_tokenizer(corpus: Corpus, path: str | Path) -> Path:
    """Write the corpus tokenizer as JSON (written to a temporary file, then renamed) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    corpus.tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by `save_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no tokenizer file at {path}: pass the tokenizer JSON that save_tokenizer wrote")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions for malformed JSON
        raise DataError(f"{path} is not a tokenizer JSON file ({one_line(exc)}); "
                        "pass the file that save_tokenizer wrote") from exc


def batchify(data: torch.Tensor, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into `batch_size` columns, trimming the tail that does not fill a row.

    The alphabet with batch_size=4 (as in pytorch/examples word_language_model)::

        a g m s
        b h n t     26 tokens -> (T=6, B=4); y and z are trimmed.
        c i o u     Each column is a contiguous stretch of text read top to bottom,
        d j p v     so the hidden state carried from one BPTT window to the next
        e k q w     continues the same text. The columns are independent streams.
        f l r x

    Returns a (T, B) tensor with T = len(data) // batch_size, on `device` if given.
    """
    if data.dim() != 1:
        raise ValueError(f"batchify expects a 1-D token tensor, got shape {tuple(data.shape)}")
    if batch_size < 1 or 2 * batch_size > data.numel():  # two rows: one input token and its target per column
        raise ConfigError(f"batch_size={batch_size} does not fit a stream of {data.numel()} tokens (each column "
                          f"needs two): use a batch size of at most {data.numel() // 2}, or more tokens")
    rows = data.numel() // batch_size
    # (B*T,) -> (B, T): row b is the b-th stretch of text; transpose so time runs down the columns.
    batched = data[: rows * batch_size].view(batch_size, rows).t().contiguous()  # (T, B)
    return batched if device is None else batched.to(device)


def batchify_share(data: torch.Tensor, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """This process's columns of `batchify(data, batch_size)`: (T, batch_size / processes) in a distributed run, where
    each process takes its own contiguous columns of the global batch (`shared.distributed.shard`); all of them
    alone."""
    return batchify(data, batch_size, device)[:, distributed.shard(batch_size, "batch_size")].contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the BPTT window starting at row `i` of a batchified source.

    With the source from `batchify`'s example, i=1 and seq_len=2::

        x = b h n t     y = c i o u     y is x shifted one row down: the token that follows each input.
            c i o u         d j p v

    Returns x and y, both (seq_len', B), where seq_len' = min(seq_len, T - 1 - i) clips the last window.
    """
    if not 0 <= i < source.size(0) - 1:
        raise IndexError(f"window start {i} outside 0..{source.size(0) - 2} for a source of {source.size(0)} rows")
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len}: a BPTT window needs at least one step")
    seq_len = min(seq_len, source.size(0) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]  # (seq_len', B) each


def bptt_windows(n_steps: int, bptt: int, generator: torch.Generator, max_extra: int = 20,
                 vary: bool = True, spread: float = 5.0) -> Iterator[tuple[int, int]]:
    """Yield (start, seq_len) windows that cover steps 0..n_steps-1 once, in order.

    For a batchified source of T rows pass n_steps = T - 1 (the last row is only ever a target). With
    `vary` (AWD-LSTM), each window's base length is `bptt` with probability 0.95, else bptt / 2, and
    seq_len = max(5, int(Normal(base, spread))) capped at bptt + max_extra; the random window edges mean the
    model sees different cuts of the text every epoch. With spread = 0 a window is its base length, int(base)
    (the original DARTS search: 35, or 17 one time in twenty). Without `vary` the windows are a fixed `bptt`.
    The last window is clipped to what remains. All draws come from `generator`, so restoring its
    state (`generator.set_state`) replays the same windows.
    """
    if n_steps < 0 or bptt < 1 or max_extra < 0 or spread < 0:
        raise ConfigError(f"bptt_windows needs n_steps >= 0, bptt >= 1, max_extra >= 0 and spread >= 0; "
                          f"got n_steps={n_steps}, bptt={bptt}, max_extra={max_extra}, spread={spread}")
    start = 0
    while start < n_steps:
        seq_len = _draw_seq_len(bptt, generator, max_extra, spread) if vary else bptt
        seq_len = min(seq_len, n_steps - start)
        yield start, seq_len
        start += seq_len


def scale_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float, seq_len: int, bptt: int) -> None:
    """Every group's lr to learning_rate * seq_len / bptt: longer windows, larger steps (AWD-LSTM); seq_len = bptt
    puts the configured rate back."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * seq_len / bptt


def unigram_perplexity(corpus: Corpus) -> float:
    """Perplexity on the valid split of the unigram model with train-split frequencies (a floor any LM must beat)."""
    counts = torch.bincount(corpus.train, minlength=corpus.ntoken).double()  # (ntoken,)
    log_probs = counts.log() - counts.sum().log()  # (ntoken,)
    return math.exp(-log_probs[corpus.valid].mean().item())


def _draw_seq_len(bptt: int, generator: torch.Generator, max_extra: int, spread: float) -> int:
    # The draws come in a fixed order, so the generator state alone decides the sequence.
    base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
    if not spread:
        return max(1, int(base))
    seq_len = max(5, int(torch.normal(float(base), spread, size=(), generator=generator).item()))
    return min(seq_len, bptt + max_extra)


def _read_local(folder: Path) -> dict[str, list[str]]:
    """The lines of each split file of `folder`, read with the `datasets` text loader."""
    paths = {split: folder / name for split, name in SPLIT_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"{folder} has no {' or '.join(missing)}: a corpus folder needs ptb.train.txt, "
                        "ptb.valid.txt and ptb.test.txt (one sentence per line); add the missing file")
    for split, path in paths.items():
        if path.stat().st_size == 0:
            raise _empty_split(split, str(path))
    import datasets  # imported here: it takes seconds and only loading needs it

    features = datasets.Features({"text": datasets.Value("string")})
    # The arrow cache goes to a temporary folder and the tables are kept in memory: PTB is 5 MB, re-reading it
    # is faster than managing a persistent cache, and nothing is left behind.
    with tempfile.TemporaryDirectory(prefix="ptb-") as cache_dir, quiet_progress_bars():
        try:
            dataset = datasets.load_dataset("text", data_files={s: str(p) for s, p in paths.items()},
                                            features=features, cache_dir=cache_dir, keep_in_memory=True)
        except Exception as exc:  # datasets wraps decoding errors in DatasetGenerationError
            _raise_if_not_utf8(paths.values())
            raise DataError(f"could not read the corpus in {folder}: {one_line(exc.__cause__ or exc)}; "
                            "check that the three files are plain text, one sentence per line") from exc
        # Slicing the whole split returns its column as one list; iterating a Column goes row by row (~100x slower).
        return {split: dataset[split][:]["text"] for split in SPLIT_FILES}


def _read_hub(folder: Path) -> dict[str, list[str]]:
    """The lines of each split of the hub copy of PTB; fails fast (DataError) when offline."""
    remedies = (f"no corpus folder at {folder.absolute()}: point data_dir or DARTS_DATA_DIR at a folder with "
                f"ptb.train.txt, ptb.valid.txt and ptb.test.txt, or go online to download PTB from the "
                f"Hugging Face hub ({HUB_ID})")
    if offline_reason() is None:
        logger.warning("no corpus folder at %s; trying the Hugging Face hub (%s)", folder, HUB_ID)
    try:
        files = {hub_split: f"{HUB_PARQUET}/{hub_split}/*.parquet" for hub_split in HUB_SPLITS.values()}
        dataset = load_hub_dataset(HUB_ID, "parquet", data_files=files)
        return {split: dataset[hub_split][:][HUB_COLUMN] for split, hub_split in HUB_SPLITS.items()}
    except DataError as error:
        raise DataError(f"{remedies} ({error})") from error
    except Exception as error:  # a dataset without the expected splits or column
        raise DataError(f"{remedies} (the hub copy is not PTB as expected: {type(error).__name__}: "
                        f"{one_line(error)})") from error


def _build_corpus(lines: dict[str, list[str]], names: dict[str, str], source: str,
                  vocabulary: VocabularyConfig = VocabularyConfig()) -> Corpus:
    """Train the vocabulary on the training lines and encode the three splits."""
    for split, split_lines in lines.items():
        if not any(line.strip() for line in split_lines):
            raise _empty_split(split, names[split])
    tokenizer = _train_tokenizer(lines["train"], vocabulary)
    split_words = tokenizer.pre_tokenizer.pre_tokenize_str  # the words as the tokenizer cuts them
    counts = {split: Counter(word for line in split_lines for word, _ in split_words(line))
              for split, split_lines in lines.items()}
    vocab = tokenizer.get_vocab()
    if UNK not in vocab and any(word not in vocab for split_counts in counts.values() for word in split_counts):
        tokenizer = _with_tokens(tokenizer, {**vocab, UNK: len(vocab)})  # the text has none: a new last id
    vocab = tokenizer.get_vocab()
    oov = {split: sum(n for word, n in split_counts.items() if word not in vocab) / max(1, sum(split_counts.values()))
           for split, split_counts in counts.items()}
    ids = {split: _encode(tokenizer, split_lines, split, names[split]) for split, split_lines in lines.items()}
    return Corpus(tokenizer=tokenizer, source=source, oov=oov, **ids)


def _train_tokenizer(train_lines: Sequence[str], vocabulary: VocabularyConfig = VocabularyConfig()) -> Tokenizer:
    """A WordLevel tokenizer over whitespace-split words of the training lines that appends <eos> to each line;
    ids follow the training frequencies (<eos> first), as many words as `vocabulary` keeps."""
    # unk_token names <unk> either way; lookups fall back to it once it is in the vocabulary.
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    size = _UNBOUNDED_VOCAB if vocabulary.vocab_size is None else vocabulary.vocab_size + 1  # + <eos>
    trainer = trainers.WordLevelTrainer(vocab_size=size, min_frequency=vocabulary.min_frequency,
                                        special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator(train_lines, trainer)
    _append_eos(tokenizer)
    return tokenizer


def _with_tokens(tokenizer: Tokenizer, vocab: dict[str, int]) -> Tokenizer:
    """`tokenizer` with the vocabulary `vocab` (word -> id)."""
    rebuilt = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    rebuilt.pre_tokenizer = tokenizer.pre_tokenizer
    _append_eos(rebuilt)
    return rebuilt


def _append_eos(tokenizer: Tokenizer) -> None:
    # The post-processor, not the caller, appends <eos>, so the saved tokenizer reproduces the corpus ids.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])


def _encode(tokenizer: Tokenizer, lines: Sequence[str], split: str, name: str) -> torch.Tensor:
    """Token ids of all lines of one split, concatenated: (N,) int64."""
    try:
        encodings = tokenizer.encode_batch(lines)
    except Exception as exc:  # tokenizers raises bare Exceptions
        raise DataError(f"could not tokenize the {split} split ({name}): {one_line(exc)}") from exc
    total = sum(len(e.ids) for e in encodings)
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
    return torch.from_numpy(flat)


def _raise_if_not_utf8(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8, "
                            f"e.g. iconv -f latin1 -t utf-8") from exc


def _empty_split(split: str, name: str) -> DataError:
    return DataError(f"the {split} split ({name}) holds no words; every split needs text, one sentence per line")


