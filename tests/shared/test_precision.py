"""precision=bf16: the hypergradient under bf16 autocast points where fp32's does, on both search spaces at the
smoke configs' sizes, and the passes that must stay fp32 do."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.nn.functional import cosine_similarity

from shared.bilevel import LossFn
from shared.errors import ConfigError


def rnn_task(order: str) -> tuple[Any, LossFn, LossFn]:
    """The RNN smoke's model (32 wide, 4 nodes, its dropouts) and optimizer on random windows of PTB's shape."""
    from rnn_darts.data import synthetic_corpus
    from rnn_darts.search import RNNSearchTask, SearchConfig
    from rnn_darts.supernet import SupernetConfig

    model = SupernetConfig(ninp=32, nhid=32, steps=4, input_init_range=1.0, dropout=0.1, dropouth=0.05,
                           dropoutx=0.1, dropouti=0.05)
    config = SearchConfig(order=order, batch_size=16, eval_batch_size=16, learning_rate=5.0)
    task = RNNSearchTask(synthetic_corpus(10_000, tokens=2_000, seed=0), model, config, torch.device("cpu"), seed=0)
    x, y, xa, ya = (torch.randint(10_000, (35, 16), generator=torch.Generator().manual_seed(i)) for i in range(4))
    hidden = task.model.init_hidden(16)
    return task, task.loss(x, y, hidden, True), task.loss(xa, ya, hidden, False)


def cnn_task(order: str) -> tuple[Any, LossFn, LossFn]:
    """The CNN smoke's supernet (C 4, 3 cells) at its batch of 32 random images."""
    from cnn_darts.data import synthetic_images
    from cnn_darts.search import CNNSearchTask, SearchConfig
    from cnn_darts.supernet import SupernetConfig

    task = CNNSearchTask(synthetic_images(train=64, test=32, seed=0), SupernetConfig(C=4, layers=3),
                         SearchConfig(order=order, batch_size=32), torch.device("cpu"), seed=0)
    generator = torch.Generator().manual_seed(0)
    x, xa = (torch.randn(32, 3, 32, 32, generator=generator) for _ in range(2))
    y, ya = (torch.randint(10, (32,), generator=generator) for _ in range(2))
    return task, task.loss(x, y), task.loss(xa, ya)


def hypergradient(task: Any, train_loss: LossFn, valid_loss: LossFn, precision: str) -> torch.Tensor:
    task.engine.config = dataclasses.replace(task.engine.config, precision=precision)
    torch.manual_seed(5)  # the same dropout masks in both precisions
    return torch.cat([g.flatten() for g in task.engine.hypergradient(train_loss, valid_loss).grads])


@pytest.mark.parametrize("order", ["first", "second"])  # exact: as second, its bf16 pass is the same one
@pytest.mark.parametrize("build", [rnn_task, cnn_task], ids=["rnn", "cnn"])
def test_bf16_hypergradient_points_where_fp32_does(build: Any, order: str) -> None:
    torch.manual_seed(0)
    task, train_loss, valid_loss = build(order)
    task.model.train()
    fp32 = hypergradient(task, train_loss, valid_loss, "fp32")
    bf16 = hypergradient(task, train_loss, valid_loss, "bf16")
    assert not torch.equal(fp32, bf16)  # autocast did take over some passes
    assert float(cosine_similarity(fp32, bf16, dim=0)) >= 0.99
    assert fp32.dtype == bf16.dtype == torch.float32  # the alphas' gradient, and so their update, in fp32


def test_the_fp32_passes_run_without_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Second order in bf16: the weight step's and the validation pass's forward under autocast, the training pass
    behind w' and the two +-eps passes without."""
    task, train_loss, valid_loss = rnn_task("second")
    seen: list[bool] = []

    def spy(loss: LossFn) -> LossFn:
        return lambda forward: seen.append(torch.is_autocast_enabled("cpu")) or loss(forward)

    task.engine.config = dataclasses.replace(task.engine.config, precision="bf16")
    task.engine.arch_step(spy(train_loss), spy(valid_loss))
    assert seen == [False, True, False, False]
    seen.clear()
    task.engine.weight_step(spy(train_loss))
    assert seen == [True]


def test_unknown_precision_is_one_line() -> None:
    from rnn_darts.search import SearchConfig

    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        SearchConfig(precision="fp16")
