"""The convolutional-cell search task: CIFAR-10 halves, augmentation and losses handed to the shared loop and engine.

The 50,000 training images are split in two (deterministic from the seed): one half trains the weights, the other
drives the architecture and is what `evaluate` scores, as in the paper. Per step: an architecture step on the next
architecture batch, then a weight step on the next weight batch; the weight learning rate follows a cosine schedule
over the configured epochs (so xi does too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_darts.data import ImageData, batches, split_search
from cnn_darts.metrics import accuracy_metrics, classify, progress_postfix
from cnn_darts.supernet import Supernet, SupernetConfig
from shared import distributed
from shared.device import check_fits
from shared.bilevel import ORDERS, PRECISIONS, Bilevel, BilevelConfig, LossFn
from shared.compiled import check_compile
from shared.collapse import CollapseConfig, eigen_metrics
from shared.errors import ConfigError
from shared.genotypes import CNNGenotype
from shared.loop import EpochProgress, SchedulerGeneratorState
from shared.controller import ControllerConfig, strategy_for
from shared.sampling import check_strategy
from shared.validation import check_at_least, check_choice, check_fields

PARAMETER_FREE = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")  # ops with no weights of their own


@dataclass(frozen=True)
class SearchConfig:
    order: str = "second"  # first | second | exact | plain (weight steps only)
    precision: str = "fp32"  # fp32 | bf16 (autocast in the weight step and the architecture passes: BilevelConfig)
    compile: str = "off"  # off | a torch.compile mode for the supernet's cells (shared.compiled.COMPILE_MODES)
    epochs: int = 50  # the length of the cosine schedule
    batch_size: int = 64
    learning_rate: float = 0.025
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    train_portion: float = 0.5  # the share of the training images that trains the weights
    train_images: int | None = None  # use only the first N training images (smoke runs)
    strategy: str = "darts"  # darts | random (weight sharing: shared.sampling) | reinforce (shared.controller)
    select_cells: int = 10  # random, reinforce: cells scored on the architecture half after each epoch; best kept

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("order", self.order, ORDERS)
        check_choice("precision", self.precision, PRECISIONS)
        check_compile(self.order, self.compile)
        check_strategy(self.strategy, self.select_cells)
        check_at_least(self, 0, "momentum", "weight_decay", "arch_weight_decay")
        check_at_least(self, 1, "train_images")
        if not 0 < self.train_portion < 1:
            raise ConfigError(f"train_portion must be in (0, 1), got {self.train_portion}")
        for name in ("epochs", "batch_size", "learning_rate", "grad_clip", "arch_learning_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.learning_rate_min <= self.learning_rate:
            raise ConfigError(f"learning_rate_min must be in [0, learning_rate], got {self.learning_rate_min}")


class CNNSearchTask(SchedulerGeneratorState):
    """DARTS on the convolutional search space; implements `shared.loop.EpochTask`."""

    kind = "cnn_search"  # the experiment whose checkpoints it writes

    skip_metric = "skip_connect_normal"  # what early_stop=skip counts (DARTS+)

    def __init__(self, data: ImageData, model_config: SupernetConfig, config: SearchConfig, device: torch.device,
                 seed: int, collapse: CollapseConfig = CollapseConfig(),
                 controller: ControllerConfig = ControllerConfig()) -> None:
        self.config, self.device, self.collapse = config, device, collapse
        self.data_fingerprint = data.fingerprint()
        n = min(config.train_images or len(data.train_labels), len(data.train_labels))
        weight_index, arch_index = split_search(n, seed, config.train_portion)
        images, labels = data.train_images.to(device), data.train_labels.to(device)  # resident on the device
        self.weight_data = images[weight_index.to(device)], labels[weight_index.to(device)]
        self.arch_data = images[arch_index.to(device)], labels[arch_index.to(device)]
        if min(len(weight_index), len(arch_index)) < config.batch_size:
            raise ConfigError(f"batch_size={config.batch_size} exceeds a half of the {n} training images; "
                              f"lower batch_size or raise train_images")
        check_fits(lambda: Supernet(model_config), device, "init_channels, layers or steps")
        self.model = distributed.prepare(Supernet(model_config), device)
        self.rows = distributed.shard(config.batch_size, "batch_size")  # this process's part of every batch
        weight_opt = torch.optim.SGD(self.model.weight_parameters(), lr=config.learning_rate,
                                     momentum=config.momentum, weight_decay=config.weight_decay, foreach=True)
        arch_opt = torch.optim.Adam(self.model.arch_parameters(), lr=config.arch_learning_rate, betas=(0.5, 0.999),
                                    weight_decay=config.arch_weight_decay)
        bilevel = BilevelConfig(config.order, config.grad_clip, precision=config.precision,
                                compile=config.compile)
        self.engine = Bilevel(self.model, weight_opt, arch_opt, bilevel, distributed.average_)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(weight_opt, config.epochs,
                                                                    eta_min=config.learning_rate_min)
        self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
        self.strategy = strategy_for(config.strategy, self.model, config.select_cells, seed, controller)

    @staticmethod
    def loss(x: Tensor, y: Tensor, keep: dict[str, Tensor] | None = None) -> LossFn:
        """Cross entropy of the batch; `keep` receives the loss and the number of correct predictions."""

        def loss_fn(forward: Any) -> Tensor:
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            if keep is not None:
                keep.update(loss=loss.detach(), correct=(logits.argmax(1) == y).sum())
            return loss

        return loss_fn

    def train_step(self, x: Tensor, y: Tensor, xa: Tensor, ya: Tensor) -> dict[str, Tensor]:
        """One search step: the strategy's architecture step on (xa, ya) (none for plain or sampling), the weight
        step on (x, y). Returns the weight batch's loss and number of correct predictions, detached and on the
        device."""
        keep: dict[str, Tensor] = {}
        self.strategy.arch_step(self.engine, self.loss(x, y), self.loss(xa, ya))
        with self.strategy.weight_cell():
            self.engine.weight_step(self.loss(x, y, keep))
        self.strategy.update(lambda: self.reward(xa, ya))
        return keep

    def reward(self, xa: Tensor, ya: Tensor) -> float:
        """REINFORCE's reward for the cell set: its accuracy on the architecture batch, BatchNorm in eval mode (over
        the whole batch in a distributed run)."""
        self.model.eval()
        with torch.no_grad():
            accuracy = float((self.model(xa).argmax(1) == ya).float().mean())
        self.model.train()
        return distributed.mean(accuracy)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        config = self.config
        self.model.train()
        weight_batches = batches(*self.weight_data, config.batch_size, self.generator)
        arch_batches = batches(*self.arch_data, config.batch_size, self.generator)
        steps = min(len(self.weight_data[1]), len(self.arch_data[1])) // config.batch_size
        progress = EpochProgress(steps, f"epoch {epoch}", progress_postfix)
        for (x, y), (xa, ya) in zip(weight_batches, arch_batches):  # global batches: the same on every process
            x, y, xa, ya = x[self.rows], y[self.rows], xa[self.rows], ya[self.rows]
            keep = self.train_step(x, y, xa, ya)
            progress.add(loss=keep["loss"] * len(y), correct=keep["correct"], images=len(y))
        self.scheduler.step()
        sums = progress.close()
        return {**accuracy_metrics("train", sums), **self.curvature(epoch), **self.strategy.epoch_metrics()}

    def curvature(self, epoch: int) -> dict[str, float]:
        """The dominant eigenvalue of the architecture loss's Hessian in the alphas, on a fixed batch (the first
        `batch_size` images of the architecture half, training mode as the architecture step), when `epoch`
        measures."""
        if not self.collapse.measures(epoch) or not self.strategy.trains_alphas:
            return {}
        self.model.train()
        size = self.config.batch_size
        x, y = next(batches(self.arch_data[0][:size], self.arch_data[1][:size], size, self.generator, shuffle=False,
                            augment=False))
        x, y = x[self.rows], y[self.rows]  # this process's share (its products are averaged)
        return eigen_metrics(self.engine.alpha_hessian_eigen(self.loss(x, y), self.collapse.hessian_iterations,
                                                             self.collapse.hessian_tol))

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the architecture half (the search's validation data), BatchNorm in eval mode; for
        the sampling strategies those of the best of `select_cells` sampled cells (by loss), which becomes the
        genotype."""
        def score() -> dict[str, float]:
            self.model.eval()
            return classify(self.model, *self.arch_data, self.config.batch_size, "valid")

        return self.strategy.select(score, "valid_loss")

    def genotype(self) -> CNNGenotype:
        with self.chosen():
            return self.model.genotype()

    def chosen(self) -> ContextManager[None]:
        """The alphas the genotype is read from: the model's own, or a sampling strategy's best cell."""
        return self.strategy.chosen()

    def genotype_metrics(self, genotype: CNNGenotype) -> dict[str, float]:
        return {"skip_connect_normal": float(sum(op == "skip_connect" for op, _ in genotype.normal)),
                "parameter_free_normal": float(sum(op in PARAMETER_FREE for op, _ in genotype.normal)),
                "parameter_free_reduce": float(sum(op in PARAMETER_FREE for op, _ in genotype.reduce))}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.engine.optimizers()

    def alpha_softmax(self) -> dict[str, Tensor]:
        with self.chosen():
            return self.model.alpha_softmax()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.strategy.load_state_dict(state.get("sampler", {}))  # older DARTS checkpoints hold none
