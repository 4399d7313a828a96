"""Training a derived convolutional network: every image every epoch, the drop-path ramp, the auxiliary loss, the
held-out split."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnn_darts.data import synthetic_images
from cnn_darts.network import NetworkConfig
from cnn_darts.train import CNNTrainTask, TrainConfig
from shared.errors import ConfigError
from shared.genotypes import published


def make_task(train: int, test: int = 8, **changes) -> CNNTrainTask:
    torch.manual_seed(0)
    config = TrainConfig(**{"epochs": 4, "batch_size": 10, "eval_batch_size": 16, "cutout_size": 8, **changes})
    return CNNTrainTask(synthetic_images(train, test), published("cnn", "DARTS_V2"),
                        NetworkConfig(C=4, layers=3), config, torch.device("cpu"), seed=0)


def seen_per_epoch(task: CNNTrainTask, monkeypatch: pytest.MonkeyPatch, epoch: int = 1) -> list[int]:
    sizes: list[int] = []
    step = task.train_step
    monkeypatch.setattr(task, "train_step", lambda x, y: sizes.append(len(y)) or step(x, y))
    task.train_epoch(epoch)
    return sizes


@pytest.mark.parametrize("images, batches", [(25, [10, 10, 5]), (20, [10, 10]), (21, [10, 10])],
                         ids=["partial-last-batch", "exact", "a-last-batch-of-one-waits"])
def test_an_epoch_sees_every_image_but_never_a_batch_of_one(images: int, batches: list[int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert seen_per_epoch(make_task(images), monkeypatch) == batches


def test_drop_path_ramps_linearly_from_zero_as_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task(20, drop_path_prob=0.2)
    ramp = [task.train_epoch(epoch)["drop_path_prob"] for epoch in (1, 2, 3, 4)]
    assert ramp == pytest.approx([0.0, 0.05, 0.1, 0.15])  # 0.2 * (epoch - 1) / 4: epoch 0..3 of the original


def test_the_loss_adds_the_auxiliary_heads_loss_with_its_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task(20, auxiliary_weight=0.4, grad_clip=1e9)
    x, y = torch.randn(10, 3, 32, 32), torch.randint(10, (10,))
    torch.manual_seed(5)
    logits, aux = task.model(x)
    expected = torch.autograd.grad(F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y),
                                   task.model.classifier.weight)[0]
    monkeypatch.setattr(task.optimizer, "step", lambda: None)  # keep the gradient, skip the update
    torch.manual_seed(5)
    task.train_step(x, y)
    assert torch.allclose(task.model.classifier.weight.grad, expected, atol=1e-6)
    assert task.model.auxiliary_head.classifier.weight.grad.abs().sum() > 0


def test_held_out_validation_images_leave_the_training_set_or_the_test_split_validates() -> None:
    task = make_task(40, valid_images=12)
    assert len(task.train_data[1]) == 28 and len(task.valid_data[1]) == 12 and len(task.test_data[1]) == 8
    train = {bytes(image.flatten().tolist()) for image in task.train_data[0]}
    assert not any(bytes(image.flatten().tolist()) in train for image in task.valid_data[0])
    original = make_task(40)  # valid_images=0: validation on the test split, as the original; all 40 train
    assert len(original.train_data[1]) == 40 and torch.equal(original.valid_data[0], original.test_data[0])


@pytest.mark.parametrize("field, value", [("test_images", 0), ("train_images", 0), ("drop_path_prob", 1.0),
                                          ("auxiliary_weight", -0.1), ("epochs", 0)])
def test_bad_training_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        TrainConfig(**{field: value})
