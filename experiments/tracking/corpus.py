"""The corpus of the recurrent-cell experiments, recorded with their run."""
from __future__ import annotations

from typing import Any

from experiments.tracking.config import config_values
from experiments.tracking.recorder import add_written_artifact
from rnn_darts.data import Corpus, VocabularyConfig, load_corpus, save_tokenizer, unigram_perplexity


def recorded_corpus(run: Any, config: dict[str, Any]) -> Corpus:
    """The RNN experiments' corpus (`data_dir`, the vocabulary keys), its tokenizer saved as the artifact
    `tokenizer.json`, its out-of-vocabulary shares as run info `oov_rate` and the valid perplexity of its unigram
    model (the floor any language model must beat: the report draws it) as `unigram_valid_ppl`."""
    corpus = load_corpus(config["data_dir"], VocabularyConfig(**config_values(VocabularyConfig, config)))
    add_written_artifact(run, "tokenizer.json", lambda path: save_tokenizer(corpus, path))
    run.info["oov_rate"] = corpus.oov
    run.info["unigram_valid_ppl"] = unigram_perplexity(corpus)
    return corpus
