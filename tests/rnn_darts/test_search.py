"""The recurrent search on a tiny generated corpus: every order, resume, tied weights, masks, divergence."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from rnn_darts.data import load_corpus
from rnn_darts.search import RNNSearchTask, SearchConfig, log_unigram
from rnn_darts.supernet import SupernetConfig
from shared import checkpoint
from shared.bilevel import Bilevel, BilevelConfig
from shared.collapse import CollapseConfig
from shared.genotypes import RNNGenotype
from shared.loop import Diverged, EpochRecord, run_epochs
from shared.virtual_step import unrolled_step


def write_corpus(folder: Path, words: int = 30, lines: int = 120, seed: int = 0) -> Path:
    """A three-file corpus with a little structure (each sentence counts up from a random word)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(words)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 3), ("test", lines // 3)):
        text = []
        for _ in range(n):
            start = rng.randrange(words)
            text.append(" ".join(vocab[(start + k) % words] for k in range(rng.randint(4, 9))))
        (folder / f"ptb.{split}.txt").write_text("\n".join(text) + "\n")
    return folder


class ListRecorder:
    def __init__(self) -> None:
        self.records: list[EpochRecord] = []

    def epoch(self, record: EpochRecord, history: list[EpochRecord]) -> None:
        self.records.append(record)

    def checkpoint(self, path: Path, epoch: int) -> None:
        pass


TINY_MODEL = dict(ninp=12, nhid=12, steps=3, dropout=0.2, dropouth=0.1, dropoutx=0.2, dropouti=0.1)


def make_task(corpus, order: str = "second", seed: int = 0, **changes) -> RNNSearchTask:
    torch.manual_seed(seed)
    config = SearchConfig(**{"order": order, "batch_size": 4, "eval_batch_size": 3, "bptt": 6, **changes})
    return RNNSearchTask(corpus, SupernetConfig(ntoken=corpus.ntoken, **TINY_MODEL), config, torch.device("cpu"),
                         seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(write_corpus(tmp_path_factory.mktemp("corpus")))


@pytest.mark.parametrize("order", ["first", "second", "exact", "plain"])
def test_a_search_epoch_runs_for_every_order_and_yields_a_valid_genotype(corpus, tmp_path, order: str) -> None:
    task = make_task(corpus, order)
    alphas = task.model.alphas.detach().clone()
    recorder = ListRecorder()
    history = run_epochs(task, 1, tmp_path / "checkpoint.pt", recorder, config={"order": order})
    record = history[0]
    assert isinstance(record.genotype, RNNGenotype) and record.genotype.steps == 3
    for name in ("train_ppl", "valid_ppl", "train_loss", "valid_loss", "identity_share", "epoch_time"):
        assert torch.isfinite(torch.tensor(record.metrics[name])), name
    assert 1 < record.metrics["valid_ppl"] < 1e6
    moved = not torch.equal(task.model.alphas.detach(), alphas)
    assert moved == (order != "plain")
    assert torch.tensor(record.alphas["alphas"]).shape == (6, 5)
    assert recorder.records == history
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_compiled_search_epoch_runs_every_pass_compiled_and_measures_the_hessian(corpus, tmp_path,
                                                                                   compiled_graphs: list) -> None:
    """compile: the weight step, the second-order passes and evaluation compile the cell's time step in more
    variants than torch's default limit of 8, past which the rest would run eager; the Hessian runs eager."""
    torch.manual_seed(0)
    config = SearchConfig(order="second", batch_size=4, eval_batch_size=3, bptt=6, compile="default")
    task = RNNSearchTask(corpus, SupernetConfig(ntoken=corpus.ntoken, **TINY_MODEL), config, torch.device("cpu"), 0,
                         CollapseConfig(hessian_every=1))
    history = run_epochs(task, 1, tmp_path / "checkpoint.pt", ListRecorder(), config={})
    assert len(compiled_graphs) > 8
    assert 1 < history[0].metrics["valid_ppl"] < 1e6 and math.isfinite(history[0].metrics["hessian_eigenvalue"])


def test_windows_are_the_original_searchs_training_bptt_or_half_and_architecture_bptt(corpus, monkeypatch) -> None:
    """Training windows of bptt tokens, one in twenty bptt / 2; architecture windows always bptt, contiguous in
    their stream (clipped only at its end, where it restarts), whatever the training window's length."""
    task, lengths = make_task(corpus, "first", seed=1), []
    step = task.train_step
    monkeypatch.setattr(task, "train_step", lambda x, y, h, xa, ya, ha: lengths.append((x.size(0), xa.size(0)))
                        or step(x, y, h, xa, ya, ha))
    for epoch in (1, 2):
        lengths.clear()
        task.train_epoch(epoch)
        train, arch = zip(*lengths)
        assert set(train[:-1]) <= {6, 3} and 3 in train  # the last window of an epoch is clipped
        expected, pos, rows = [], 0, task.arch_data.size(0)  # every epoch restarts the stream
        for _ in arch:
            pos = 0 if pos + 1 >= rows else pos
            expected.append(min(6, rows - 1 - pos))
            pos += expected[-1]
        assert list(arch) == expected and expected.count(6) > len(expected) / 2


def test_arch_data_from_a_held_out_part_of_train(corpus, tmp_path) -> None:
    task = make_task(corpus, "first", arch_data="train", arch_fraction=0.25)
    train_tokens = task.train_data.numel() + task.arch_data.numel()
    assert train_tokens <= corpus.train.numel() and task.arch_data.numel() < task.train_data.numel()
    run_epochs(task, 1, tmp_path / "c.pt", ListRecorder(), config={})


class Interrupt(Exception):
    pass


def _comparable(history: list[EpochRecord]) -> list[tuple]:
    return [(r.epoch, {k: v for k, v in r.metrics.items() if k != "epoch_time"}, r.genotype, r.alphas)
            for r in history]


def test_interrupted_then_resumed_search_equals_an_uninterrupted_one(corpus, tmp_path) -> None:
    whole = run_epochs(make_task(corpus), 3, tmp_path / "whole.pt", ListRecorder(), config={})

    def stop_after_first(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_epochs(make_task(corpus), 3, tmp_path / "cut.pt", ListRecorder(), config={}, on_epoch_end=stop_after_first)
    state = checkpoint.load(tmp_path / "cut.pt")
    assert state["epoch"] == 1
    recorder = ListRecorder()
    resumed = run_epochs(make_task(corpus, seed=99), 3, tmp_path / "resumed.pt", recorder, config={}, resume=state)
    assert _comparable(resumed) == _comparable(whole)
    assert [r.epoch for r in recorder.records] == [1, 2, 3]  # the resumed run re-records the earlier epoch
    final_whole = checkpoint.load(tmp_path / "whole.pt")["model"]
    final_resumed = checkpoint.load(tmp_path / "resumed.pt")["model"]
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_a_nan_loss_stops_the_epoch_restores_the_checkpoint_and_reports(corpus, tmp_path, monkeypatch) -> None:
    task = make_task(corpus, "first")
    path = tmp_path / "checkpoint.pt"
    run_epochs(task, 1, path, ListRecorder(), config={})
    saved = checkpoint.load(path)
    original = task.loss

    def poisoned(*args, **kwargs):
        inner = original(*args, **kwargs)
        return lambda forward: inner(forward) * float("nan")

    monkeypatch.setattr(task, "loss", poisoned)
    with pytest.raises(Diverged, match=r"epoch 2 stopped: non-finite .*restored to the checkpoint of epoch 1"):
        run_epochs(task, 2, path, ListRecorder(), config={}, resume=saved)
    model = task.model.state_dict()
    assert all(torch.equal(model[k], saved["model"][k]) for k in model)  # back to the last good state
    assert checkpoint.load(path)["epoch"] == 1  # and the checkpoint was not overwritten by the bad epoch


# ---- the unrolled step on the real supernet ------------------------------------------------------------------------
def _engine(order: str, dtype=torch.float64, fd_radius: float = 0.01):
    torch.manual_seed(0)
    from rnn_darts.supernet import RNNSupernet

    model = RNNSupernet(SupernetConfig(ntoken=20, **TINY_MODEL)).to(dtype)
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=0.5, weight_decay=1e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-3)
    engine = Bilevel(model, w_opt, a_opt, BilevelConfig(order=order, grad_clip=10.0, fd_radius=fd_radius))
    x, y = torch.randint(0, 20, (7, 4)), torch.randint(0, 20, (7, 4))
    xv, yv = torch.randint(0, 20, (7, 4)), torch.randint(0, 20, (7, 4))
    hidden = model.init_hidden(4)

    def loss(inputs, targets):
        from rnn_darts.loss import language_model_loss, tar

        def fn(forward):
            logits, _, outputs, _ = forward(inputs, hidden)
            return language_model_loss(logits, targets) + tar(outputs)
        return fn

    return model, engine, loss(x, y), loss(xv, yv)


def test_the_tied_matrix_is_one_weight_updated_once_and_used_by_the_decoder_at_shifted_weights() -> None:
    model, engine, train_loss, _ = _engine("second")
    names = [n for n, _ in engine.weights]
    assert "encoder.weight" in names and "decoder.weight" not in names
    grads = torch.autograd.grad(train_loss(model), [p for _, p in engine.weights])
    shifted = dict(zip(names, unrolled_step(engine.weight_optimizer, grads, engine.config.grad_clip)[0]))
    # the virtual step of the tied matrix is the real SGD step with both uses' gradient
    expected = model.encoder.weight - 0.5 * (grads[names.index("encoder.weight")] + 1e-4 * model.encoder.weight)
    torch.testing.assert_close(shifted["encoder.weight"], expected)
    model.eval()
    tokens, hidden = torch.randint(0, 20, (5, 3)), model.init_hidden(3)
    logits = functional_call(model, shifted, (tokens, hidden))[0]
    with torch.no_grad():  # the same model with both ends of the tie moved by hand
        for name, value in shifted.items():
            model.get_parameter(name).copy_(value)
    assert model.decoder.weight is model.encoder.weight
    torch.testing.assert_close(logits, model(tokens, hidden)[0])


def test_finite_difference_matches_double_backward_on_the_supernet_with_dropout() -> None:
    """The +-eps passes must see the training pass's dropout masks, or the difference quotient is noise.

    ReLU kinks make the paper's radius (0.01) a 1% approximation on this tiny random model; at a small radius in
    float64 the two must agree to rounding, which they only do when both differentiate the same function."""
    model, engine, train_loss, valid_loss = _engine("second", fd_radius=1e-5)
    torch.manual_seed(7)
    fd = engine.hypergradient(train_loss, valid_loss).grads[0]
    _, exact_engine, _, _ = _engine("exact")
    exact_engine.model.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    exact = exact_engine.hypergradient(train_loss, valid_loss).grads[0]
    assert ((fd - exact).norm() / exact.norm()).item() < 1e-6


def test_log_unigram_is_add_one_smoothed_log_frequency() -> None:
    counts = torch.tensor([3.0, 2.0, 1.0, 1.0])  # tokens 0,0,1 plus one each over a vocabulary of 4
    torch.testing.assert_close(log_unigram(torch.tensor([0, 0, 1]), 4), (counts / counts.sum()).log())


@pytest.mark.parametrize("arch_data", ["valid", "train"])
def test_unigram_decoder_bias_sees_all_weight_data_but_no_architecture_data(corpus, arch_data: str) -> None:
    task = make_task(corpus, decoder_bias="unigram", train_tokens=200, arch_data=arch_data)
    if arch_data == "valid":  # the whole train split, though the steps use only its first 200 tokens
        expected = log_unigram(corpus.train, corpus.ntoken)
    else:  # the weight half of the capped stream: the architecture half stays unseen
        expected = log_unigram(corpus.train[:100], corpus.ntoken)
    torch.testing.assert_close(task.model.decoder.bias.detach(), expected)


@pytest.mark.parametrize("key", ["train_tokens", "eval_tokens"])
def test_zero_tokens_is_refused_as_in_the_training(key: str) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key} must be a positive number of tokens or None"):
        SearchConfig(**{key: 0})


@pytest.mark.parametrize("words", [30, 31], ids=["same-size-other-words", "other-size"])
def test_resuming_with_another_vocabulary_is_one_line_before_any_shape_error(corpus, tmp_path, words: int) -> None:
    from shared.errors import CheckpointError

    path = tmp_path / "c.pt"
    run_epochs(make_task(corpus, "first"), 1, path, ListRecorder(), config={})
    other = load_corpus(write_corpus(tmp_path / "other", words=words, seed=1))
    if words == 30:  # the same number of words, other words: rename one
        folder = tmp_path / "renamed"
        write_corpus(folder, words=30, seed=1)
        for split in ("train", "valid", "test"):
            text = (folder / f"ptb.{split}.txt").read_text().replace("w7 ", "x7 ").replace("w7\n", "x7\n")
            (folder / f"ptb.{split}.txt").write_text(text)
        other = load_corpus(folder)
        assert other.ntoken == corpus.ntoken
    with pytest.raises(CheckpointError, match="vocabulary") as info:
        run_epochs(make_task(other, "first"), 2, path, ListRecorder(), config={}, resume=checkpoint.load(path))
    assert "\n" not in str(info.value) and "data_dir the run used" in str(info.value)
