"""Train a convolutional cell from scratch on CIFAR-10 (the paper's evaluation), tracked by Sacred.

    python -m experiments.cnn_train with smoke data_dir=../shared/data/cifar10    # about a minute on a CPU
    python -m experiments.cnn_train with paper device=cuda                        # DARTS_V2, 20 cells, 600 epochs
    python -m experiments.cnn_train with paper genotype_from=runs/7 device=cuda   # the final cell of search run 7
    python -m experiments.cnn_train print_config                                  # every option, commented
"""
from __future__ import annotations

from typing import Any

from cnn_darts.data import ImageDataConfig, load_images
from cnn_darts.network import NetworkConfig
from cnn_darts.train import CNNTrainTask, TrainConfig
from experiments.tracking.config import RESUMABLE_CHANGES, RunConfig, add_shared_config, config_values
from experiments.tracking.experiment import experiment_main, make_experiment, run_commandline
from experiments.tracking.runs import record_training
from shared.device import resolve_device
from shared.genotypes import CNNGenotype

# The dataclasses the config fills (their defaults and the config's must agree: tests/experiments/test_configs.py),
# with the config keys named otherwise than their fields.
CONFIGS = (RunConfig, ImageDataConfig, TrainConfig, NetworkConfig)
RENAMED = {"C": "init_channels"}

ex = make_experiment("cnn_train", globals())


@ex.config
def config() -> None:
    """The paper's CIFAR-10 training of a found cell from scratch (600 epochs, 20 cells)."""
    genotype_from = "DARTS_V2"  # a published name (DARTS_V1, DARTS_V2), a genotype JSON file, or a search run folder
    seed = 0  # the original cnn/train.py's; seeds the weights, the held-out split, augmentation and drop path
    epochs = 600  # also the length of the cosine schedule and of the drop-path ramp
    batch_size = 96
    eval_batch_size = 256  # validation and test
    learning_rate = 0.025  # SGD, cosine-annealed to learning_rate_min over the epochs
    learning_rate_min = 0.0
    momentum = 0.9
    weight_decay = 3e-4
    grad_clip = 5.0  # max norm of the gradient
    auxiliary = True  # the auxiliary head after 2/3 of the cells
    auxiliary_weight = 0.4  # its share of the loss
    drop_path_prob = 0.2  # reached linearly at the last epoch
    cutout_size = 16  # 0: no cutout
    valid_images = 0  # 0: validate on the test split every epoch (the original); N: hold N training images out
    train_images = None  # only the first N training images (None: all)
    test_images = None  # only the first N test images (None: all)
    init_channels = 36  # C of the first cell
    layers = 20  # cells; reductions at 1/3 and 2/3 of the depth


add_shared_config(ex, search=False, images=True)  # device, threads, resume, time_limit, `paper`


@ex.named_config
def smoke() -> None:
    """About a minute on a 2-core CPU: DARTS_V2 in 5 cells of 8 channels, 2 epochs over 1024 images."""
    epochs = 2
    batch_size = 32
    learning_rate = 0.05
    train_images = 1024
    valid_images = 128
    test_images = 512
    init_channels = 8
    layers = 5
    threads = 2


@experiment_main(ex, "test_acc")
def main(run: Any, config: dict[str, Any], log: Any) -> dict[str, Any]:
    def build_task(genotype: CNNGenotype) -> CNNTrainTask:
        data = load_images(ImageDataConfig(**config_values(ImageDataConfig, config)), config["data_dir"])
        model_config = NetworkConfig(num_classes=len(data.classes), **config_values(NetworkConfig, config, RENAMED))
        return CNNTrainTask(data, genotype, model_config, TrainConfig(**config_values(TrainConfig, config)),
                            resolve_device(config["device"]), config["seed"])

    # `epochs` is the length of the cosine schedule, so a resumed run must keep it.
    return record_training(run, log, config, "cnn", build_task, "valid_acc", best=max,
                           may_change=RESUMABLE_CHANGES - {"epochs"})


if __name__ == "__main__":
    run_commandline(ex)
