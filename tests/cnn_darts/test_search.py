"""The convolutional search on tiny generated images: every order, resume, genotype, checkpoint contents."""
from __future__ import annotations

import pytest
import torch

from cnn_darts.data import ImageData
from cnn_darts.search import CNNSearchTask, SearchConfig
from cnn_darts.supernet import SupernetConfig
from shared import checkpoint
from shared.errors import ConfigError
from shared.genotypes import CNNGenotype
from shared.loop import EpochRecord, run_epochs
from tests.rnn_darts.test_search import Interrupt, ListRecorder, _comparable


def tiny_images(n: int = 48, size: int = 8, seed: int = 0) -> ImageData:
    """Two classes a small convnet can tell apart: bright and dark images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.randint(0, 120, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    images = base + (labels * 120).to(torch.uint8).view(n, 1, 1, 1)
    return ImageData(images, labels, images[:8], labels[:8], ("dark", "bright"), "generated")


def make_task(order: str = "second", seed: int = 0, **changes) -> CNNSearchTask:
    torch.manual_seed(seed)
    config = SearchConfig(**{"order": order, "epochs": 3, "batch_size": 8, **changes})
    model = SupernetConfig(C=4, num_classes=2, layers=3, steps=2, multiplier=2)
    return CNNSearchTask(tiny_images(), model, config, torch.device("cpu"), seed)


@pytest.mark.parametrize("order", ["first", "second", "exact", "plain"])
def test_a_search_epoch_runs_for_every_order_and_yields_a_valid_genotype(tmp_path, order: str) -> None:
    task = make_task(order)
    alphas = {k: v.clone() for k, v in task.alpha_softmax().items()}
    history = run_epochs(task, 1, tmp_path / "checkpoint.pt", ListRecorder(), config={})
    record = history[0]
    assert isinstance(record.genotype, CNNGenotype) and record.genotype.steps == 2
    assert set(record.metrics) >= {"train_loss", "train_acc", "valid_loss", "valid_acc", "skip_connect_normal",
                                   "epoch_time"}
    assert 0 <= record.metrics["valid_acc"] <= 1 and 0 <= record.metrics["skip_connect_normal"] <= 4
    moved = any(not torch.equal(alphas[k], v) for k, v in task.alpha_softmax().items())
    assert moved == (order != "plain")
    assert set(record.alphas) == {"alphas_normal", "alphas_reduce"}


def test_cosine_schedule_and_halves(tmp_path) -> None:
    task = make_task("first")
    assert len(task.weight_data[1]) == len(task.arch_data[1]) == 24
    run_epochs(task, 2, tmp_path / "c.pt", ListRecorder(), config={})
    lr = task.engine.weight_optimizer.param_groups[0]["lr"]
    expected = 0.001 + (0.025 - 0.001) * (1 + torch.cos(torch.tensor(2 / 3 * torch.pi))).item() / 2
    assert lr == pytest.approx(expected)


def test_interrupted_then_resumed_search_equals_an_uninterrupted_one(tmp_path) -> None:
    whole = run_epochs(make_task(), 3, tmp_path / "whole.pt", ListRecorder(), config={})

    def stop_after_first(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_epochs(make_task(), 3, tmp_path / "cut.pt", ListRecorder(), config={}, on_epoch_end=stop_after_first)
    torch.manual_seed(123)  # whatever the global state, the checkpoint decides
    resumed = run_epochs(make_task(), 3, tmp_path / "resumed.pt", ListRecorder(), config={},
                     resume=checkpoint.load(tmp_path / "cut.pt"))
    assert _comparable(resumed) == _comparable(whole)


def test_batch_larger_than_a_half_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="batch_size=64 exceeds a half"):
        make_task(batch_size=64)
