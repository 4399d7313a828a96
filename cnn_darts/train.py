"""Training a derived convolutional network from scratch on CIFAR-10: the paper's evaluation recipe (cnn/train.py of
quark0/darts).

Per step: a batch with crop, flip and cutout; cross entropy of the logits plus `auxiliary_weight` times that of the
auxiliary head; the gradient clipped; SGD with momentum. Per epoch the learning rate follows a cosine schedule over
`epochs`, and the drop-path probability ramps linearly from 0 (epoch 1) towards `drop_path_prob`, as the original's
`drop_path_prob * epoch / epochs` with its 0-based epoch.

Validation: the original validated on the test split every epoch; `valid_images=0` does that, `valid_images=N`
holds N training images out (drawn from the seed) for validation, so the test split is seen once, at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnn_darts.data import ImageData, batches
from cnn_darts.metrics import accuracy_metrics, classify, progress_postfix
from cnn_darts.network import NetworkCIFAR, NetworkConfig
from shared import distributed
from shared.device import check_fits
from shared.errors import ConfigError
from shared.genotypes import CNNGenotype
from shared.loop import EpochProgress, FixedGenotypeTask, SchedulerGeneratorState
from shared.validation import check_counts, check_fields


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of a from-scratch training; the defaults are the paper's (appendix A.2, cnn/train.py)."""

    epochs: int = 600  # the length of the cosine schedule and of the drop-path ramp
    batch_size: int = 96
    eval_batch_size: int = 256  # validation and test (no effect on the numbers: BatchNorm in eval mode)
    learning_rate: float = 0.025
    learning_rate_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary_weight: float = 0.4  # with NetworkConfig.auxiliary; 0 ignores the head's logits
    drop_path_prob: float = 0.2
    cutout_size: int = 16  # 0: no cutout
    valid_images: int = 0  # 0: validate on the test split (the original); N: hold N training images out
    train_images: int | None = None  # use only the first N training images (smoke runs)
    test_images: int | None = None  # use only the first N test images (smoke runs)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("epochs", "batch_size", "eval_batch_size", "learning_rate", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        for name in ("momentum", "weight_decay", "auxiliary_weight", "cutout_size", "valid_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.learning_rate_min <= self.learning_rate:
            raise ConfigError(f"learning_rate_min must be in [0, learning_rate], got {self.learning_rate_min}")
        check_counts(self, "images", "train_images", "test_images")
        if not 0 <= self.drop_path_prob < 1:
            raise ConfigError(f"drop_path_prob must be in [0, 1), got {self.drop_path_prob}")


Images = tuple[Tensor, Tensor]  # uint8 (N, 3, H, W), int64 (N,)


def split_holdout(data: ImageData, config: TrainConfig, seed: int, device: torch.device
                  ) -> tuple[Images, Images, Images]:
    """Training, validation and test images with their labels, on `device`: see the module docstring."""
    n = min(config.train_images or len(data.train_labels), len(data.train_labels))
    images, labels = data.train_images[:n].to(device), data.train_labels[:n].to(device)
    test = data.test_images[:config.test_images].to(device), data.test_labels[:config.test_images].to(device)
    if config.valid_images == 0:
        return (images, labels), test, test
    if config.valid_images + config.batch_size > n:
        raise ConfigError(f"valid_images={config.valid_images} leaves fewer than batch_size={config.batch_size} of "
                          f"the {n} training images; lower valid_images or raise train_images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    held, kept = order[:config.valid_images], order[config.valid_images:].sort().values
    return (images[kept], labels[kept]), (images[held], labels[held]), test


class CNNTrainTask(FixedGenotypeTask, SchedulerGeneratorState):
    """A derived convolutional network trained from scratch; implements `shared.loop.EpochTask`."""

    kind = "cnn_train"  # the experiment whose checkpoints it writes

    def __init__(self, data: ImageData, genotype: CNNGenotype, model_config: NetworkConfig, config: TrainConfig,
                 device: torch.device, seed: int) -> None:
        self.config, self.device, self.fixed_genotype = config, device, genotype
        self.data_fingerprint = data.fingerprint()
        self.train_data, self.valid_data, self.test_data = split_holdout(data, config, seed, device)
        if len(self.train_data[1]) < config.batch_size:
            raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(self.train_data[1])} training "
                              f"images; lower batch_size or raise train_images")
        check_fits(lambda: NetworkCIFAR(model_config, genotype), device, "init_channels or layers")
        self.model = distributed.prepare(NetworkCIFAR(model_config, genotype), device)
        self.rows = distributed.shard(config.batch_size, "batch_size")  # this process's part of every batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                         weight_decay=config.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.epochs,
                                                                    eta_min=config.learning_rate_min)
        self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One SGD step on the batch; returns its (main-head) loss and number of correct predictions, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        logits, aux_logits = self.model(x)  # (B, classes), (B, classes) or None
        loss = F.cross_entropy(logits, y)
        total = loss if aux_logits is None else loss + self.config.auxiliary_weight * F.cross_entropy(aux_logits, y)
        total.backward()
        distributed.average_([torch.zeros_like(p) if p.grad is None else p.grad for p in self.model.parameters()])
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=True)
        self.optimizer.step()
        return {"loss": loss.detach(), "correct": (logits.argmax(1) == y).sum()}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        config = self.config
        self.model.train()
        self.model.drop_path_prob = config.drop_path_prob * (epoch - 1) / config.epochs
        # Every image every epoch, as the original's DataLoader; but a last batch of one image cannot be
        # batch-normalised, so that one waits for the next epoch's shuffle, as does any last batch in a distributed
        # run (its processes take equal shares of every batch).
        n = len(self.train_data[1])
        drop_last = n % config.batch_size == 1 or (distributed.current().several and n % config.batch_size != 0)
        steps = n // config.batch_size + (0 if drop_last or n % config.batch_size == 0 else 1)
        progress = EpochProgress(steps, f"epoch {epoch}", progress_postfix)
        rows = self.rows
        for x, y in batches(*self.train_data, config.batch_size, self.generator, drop_last=drop_last,
                            cutout_size=config.cutout_size):  # global batches: the same on every process
            x, y = x[rows], y[rows]
            keep = self.train_step(x, y)
            progress.add(loss=keep["loss"] * len(y), correct=keep["correct"], images=len(y))
        self.scheduler.step()
        sums = progress.close()
        return {**accuracy_metrics("train", sums), "drop_path_prob": self.model.drop_path_prob}

    def _score(self, data: Images, split: str) -> dict[str, float]:
        self.model.eval()
        return classify(lambda x: self.model(x)[0], *data, self.config.eval_batch_size, split)

    def evaluate(self) -> dict[str, float]:
        return self._score(self.valid_data, "valid")

    def test(self) -> dict[str, float]:
        """Loss and accuracy on the test split with the final weights (as the original reports)."""
        return self._score(self.test_data, "test")

    def num_parameters(self) -> int:
        """Without the auxiliary head, as the paper counts them."""
        return self.model.num_parameters()
