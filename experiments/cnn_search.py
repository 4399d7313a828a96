"""DARTS convolutional-cell search on CIFAR-10, tracked by Sacred.

    python -m experiments.cnn_search with smoke                   # about 2.5 minutes on a 2-core CPU
    python -m experiments.cnn_search with paper device=cuda       # the paper's search (second order, 50 epochs)
    python -m experiments.cnn_search with smoke resume=runs/7     # continue run 7 from its last checkpoint
    python -m experiments.cnn_search print_config                 # every option, commented
    torchrun --standalone --nproc_per_node=4 -m experiments.cnn_search with paper  # 4 GPUs (README: torchrun)
"""
from __future__ import annotations

from typing import Any

from cnn_darts.data import ImageDataConfig, load_images
from cnn_darts.search import CNNSearchTask, SearchConfig
from cnn_darts.supernet import SupernetConfig
from experiments.tracking.config import RESUMABLE_CHANGES, RunConfig, add_shared_config, config_values
from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from experiments.tracking.runs import run_search
from shared.collapse import CollapseConfig
from shared.controller import ControllerConfig
from shared.device import resolve_device

# The dataclasses the config fills (their defaults and the config's must agree: tests/experiments/test_configs.py),
# with the config keys named otherwise than their fields.
CONFIGS = (RunConfig, ImageDataConfig, SearchConfig, SupernetConfig, CollapseConfig, ControllerConfig)
RENAMED = {"C": "init_channels"}

ex = make_experiment("cnn_search", globals())


@ex.config
def config() -> None:
    """The paper's convolutional-cell search on CIFAR-10 (DARTS, section 3.1)."""
    seed = 2  # seeds the supernet, the weight/architecture split and the augmentation
    order = "second"  # first | second (finite-difference Hessian, eq. 7) | exact (double backward) | plain
    strategy = "darts"  # darts | random (weight sharing, Li & Talwalkar 2019) | reinforce (Zoph & Le, as ENAS): README
    select_cells = 10  # random, reinforce: cells scored on the validation data after each epoch; the best is kept
    epochs = 50
    batch_size = 64  # weight and architecture batches
    learning_rate = 0.025  # weight SGD, cosine-annealed to learning_rate_min over the epochs
    learning_rate_min = 0.001
    momentum = 0.9
    weight_decay = 3e-4
    grad_clip = 5.0  # max norm of the weight gradient (real and virtual steps)
    arch_learning_rate = 3e-4  # Adam on the alphas, betas (0.5, 0.999)
    arch_weight_decay = 1e-3
    train_portion = 0.5  # share of the 50,000 training images that trains the weights; the rest, the architecture
    train_images = None  # only the first N training images (None: all)
    init_channels = 16  # C of the first cell
    layers = 8  # cells; reductions at 1/3 and 2/3 of the depth
    steps = 4  # intermediate nodes per cell


add_shared_config(ex, search=True, images=True)  # device, threads, resume, time_limit, images, collapse, ...


@ex.named_config
def smoke() -> None:
    """About 2.5 minutes on a 2-core CPU: a tiny supernet, second order, 2 epochs of 8 steps on 512 images."""
    epochs = 2
    batch_size = 32
    train_images = 512
    init_channels = 4
    layers = 3
    threads = 2


@experiment_main(ex, "valid_acc")
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    def build_task(collapse: CollapseConfig, controller: ControllerConfig) -> CNNSearchTask:
        data = load_images(ImageDataConfig(**config_values(ImageDataConfig, config)), config["data_dir"])
        model_config = SupernetConfig(num_classes=len(data.classes), **config_values(SupernetConfig, config, RENAMED))
        return CNNSearchTask(data, model_config, SearchConfig(**config_values(SearchConfig, config)),
                             resolve_device(config["device"]), config["seed"], collapse, controller)

    # `epochs` is the length of the cosine schedule, so a resumed run must keep it.
    return run_search(run, config, build_task, "valid_acc", best=max, may_change=RESUMABLE_CHANGES - {"epochs"})


if __name__ == "__main__":
    run_commandline(ex)
