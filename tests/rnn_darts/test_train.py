"""Training a derived recurrent cell: the weight average, NT-ASGD's trigger, evaluation weights, resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnn_darts import train as train_module
from rnn_darts.data import load_corpus
from rnn_darts.model import ModelConfig
from rnn_darts.train import RNNTrainTask, TrainConfig, WeightAverage, swapped_weights
from shared.errors import ConfigError
from shared.genotypes import published
from shared.loop import run_epochs
from tests.rnn_darts.test_search import ListRecorder, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(write_corpus(tmp_path_factory.mktemp("corpus")))


def make_task(corpus, seed: int = 0, **changes) -> RNNTrainTask:
    torch.manual_seed(seed)
    config = TrainConfig(**{"batch_size": 4, "eval_batch_size": 3, "test_batch_size": 2, "bptt": 6,
                            "max_seq_len_delta": 3, **changes})
    model = ModelConfig(ntoken=corpus.ntoken, ninp=12, nhid=12, dropout=0.2, dropouth=0.1, dropoutx=0.2,
                        dropouti=0.1, dropoute=0.1)
    return RNNTrainTask(corpus, published("rnn", "DARTS_V2"), model, config, torch.device("cpu"), seed)


def test_the_weight_average_is_the_mean_of_the_iterates_it_saw() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    average = WeightAverage([param])  # starts at the current value, counting nothing yet
    iterates = [torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 4.0]), torch.tensor([0.25, 2.0])]
    for value in iterates:
        param.data.copy_(value)
        average.update()
    assert average.count == 3
    assert torch.allclose(average.mean[0], torch.stack(iterates).mean(0), atol=1e-6)


def test_swapped_weights_puts_the_own_values_back_even_after_an_error() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_weights([param], [torch.tensor([7.0, 8.0])]):
            assert param.tolist() == [7.0, 8.0]
            raise RuntimeError("inside")
    assert param.tolist() == [1.0, 2.0]


def fake_losses(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> list[list[torch.Tensor]]:
    """stream_loss returns `losses` in turn and remembers the weights it was called with."""
    seen: list[list[torch.Tensor]] = []

    def stream_loss(model, data, bptt):
        seen.append([p.detach().clone() for p in model.parameters()])
        return losses[len(seen) - 1]

    monkeypatch.setattr(train_module, "stream_loss", stream_loss)
    return seen


def test_nt_asgd_starts_averaging_as_the_original_rule_says(corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    # nonmono = 2: the loss of an epoch is compared with the best of the epochs before the last two.
    # epoch 4: 3.5 vs min(5) no; epoch 5: 3.2 vs min(5, 4) no; epoch 6: 3.6 vs min(5, 4, 3) = 3 -> average.
    fake_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.2, 3.6, 3.4])
    task = make_task(corpus, nonmono=2)
    averaged = []
    for epoch in range(1, 8):
        task.epoch = epoch
        averaged.append(task.evaluate()["averaged"])
        assert (task.average is not None) == (epoch >= 6), epoch
    assert averaged == [0.0] * 6 + [1.0]  # epoch 7 is the first validated with the mean
    assert task.averaging_from == 7
    assert task.best["epoch"] == 3 and task.best["loss"] == 3.0


def test_averaged_training_validates_and_tests_with_the_mean_and_keeps_its_own_weights(
        corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = fake_losses(monkeypatch, [2.0, 1.0, 0.5])
    task = make_task(corpus)
    task.average = WeightAverage(task.params)
    steps = []
    step = task.train_step
    monkeypatch.setattr(task, "train_step", lambda *args: steps.append(1) or step(*args))
    task.train_epoch(1)
    assert task.average.count == len(steps) > 1  # every step is averaged
    own = [p.detach().clone() for p in task.params]
    task.evaluate()  # validated with the mean, which becomes the best weights
    assert all(torch.equal(a, b) for a, b in zip(seen[0], task.average.mean))
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], own))
    assert all(torch.equal(a, b) for a, b in zip(task.params, own))  # the training weights are back
    best = [w.clone() for w in task.best["weights"]]
    task.train_epoch(2)
    task.epoch = 2
    task.evaluate()  # a better loss: the best weights move on
    assert not all(torch.equal(a, b) for a, b in zip(task.best["weights"], best))
    task.test()
    assert all(torch.equal(a, b) for a, b in zip(seen[2], task.best["weights"]))


def test_training_resumed_mid_run_equals_an_uninterrupted_run(corpus, tmp_path: Path) -> None:
    def averaging_task() -> RNNTrainTask:
        task = make_task(corpus, seed=1)
        task.average = WeightAverage(task.params)  # so the resumed state includes a running mean
        return task

    whole_task = averaging_task()
    whole = run_epochs(whole_task, 3, tmp_path / "whole.pt", ListRecorder(), config={})

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_epochs(averaging_task(), 3, tmp_path / "cut.pt", ListRecorder(), config={}, on_epoch_end=stop)
    from shared import checkpoint

    resumed_task = averaging_task()
    resumed = run_epochs(resumed_task, 3, tmp_path / "resumed.pt", ListRecorder(), config={},
                         resume=checkpoint.load(tmp_path / "cut.pt"))
    for name in ("train_loss", "valid_loss"):
        assert [r.metrics[name] for r in resumed] == [r.metrics[name] for r in whole], name
    for a, b in zip(resumed_task.model.state_dict().values(), whole_task.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed_task.average.count == whole_task.average.count
    assert all(torch.equal(a, b) for a, b in zip(resumed_task.average.mean, whole_task.average.mean))
    assert resumed_task.test() == whole_task.test()


@pytest.mark.parametrize("cut_after", [2, 3, 4], ids=["before-the-switch", "at-the-switch", "while-averaging"])
def test_a_resume_around_the_nt_asgd_switch_equals_an_uninterrupted_run(
        corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_after: int) -> None:
    # Validation losses by epoch, nonmono = 1: epoch 3 (2.5 > min(2.0)) starts the averaging from epoch 4 on.
    losses, current = [2.0, 3.0, 2.5, 1.5, 1.0], {}
    monkeypatch.setattr(train_module, "stream_loss", lambda model, data, bptt: losses[current["task"].epoch - 1])
    from shared import checkpoint

    def run(path: Path, resume=None, on_epoch_end=None) -> RNNTrainTask:
        current["task"] = task = make_task(corpus, seed=1, nonmono=1)
        run_epochs(task, 5, path, ListRecorder(), config={}, resume=resume, on_epoch_end=on_epoch_end)
        return task

    whole = run(tmp_path / "whole.pt")
    assert whole.averaging_from == 4 and whole.average.count > 0 and whole.best["epoch"] == 5

    def stop(record):
        if record.epoch == cut_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", on_epoch_end=stop)
    resumed = run(tmp_path / "resumed.pt", resume=checkpoint.load(tmp_path / "cut.pt"))
    assert (resumed.averaging_from, resumed.valid_losses, resumed.average.count) == (
        whole.averaging_from, whole.valid_losses, whole.average.count)
    assert all(torch.equal(a, b) for a, b in zip(resumed.average.mean, whole.average.mean))
    assert all(torch.equal(a, b) for a, b in zip(resumed.best["weights"], whole.best["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, whole.params))


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("learning_rate", -1.0), ("nonmono", 0),
                                          ("weight_decay", -1e-3), ("test_batch_size", True),
                                          ("train_tokens", 0), ("eval_tokens", -5)])
def test_bad_training_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        TrainConfig(**{field: value})
