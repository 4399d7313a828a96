"""One source for every config value: each experiment's Sacred defaults are the defaults of the dataclasses it fills,
they are the paper's values, `with paper` changes nothing, and every key reaches a dataclass or the run itself."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest

from experiments.tracking.config import RunConfig
from tests.conftest import assert_printed_config

EXPERIMENTS = ("rnn_search", "cnn_search", "rnn_train", "cnn_train")
# Keys the experiment or the shared run loop reads itself, not through a dataclass it fills (RunConfig's), and a
# training's genotype.
RUN_KEYS = {field.name for field in dataclasses.fields(RunConfig)} | {"genotype_from"}
# The published values (the DARTS paper and its original code) each experiment's defaults and `with paper` hold, as
# print_config shows them.
PAPER_VALUES = {
    "rnn_search": ("order = 'second'", "epochs = 50", "batch_size = 256", "bptt = 35", "learning_rate = 20.0",
                   "weight_decay = 5e-07", "grad_clip = 0.25", "beta = 0.001", "arch_learning_rate = 0.003",
                   "arch_weight_decay = 0.001", "emsize = 300", "nhid = 300", "steps = 8", "dropout = 0.75",
                   "dropouth = 0.25", "dropoutx = 0.75", "dropouti = 0.2", "dropoute = 0.0", "arch_data = 'valid'"),
    "cnn_search": ("order = 'second'", "epochs = 50", "batch_size = 64", "learning_rate = 0.025",
                   "learning_rate_min = 0.001", "momentum = 0.9", "weight_decay = 0.0003", "grad_clip = 5.0",
                   "arch_learning_rate = 0.0003", "arch_weight_decay = 0.001", "train_portion = 0.5",
                   "init_channels = 16", "layers = 8", "steps = 4"),
    "rnn_train": ("genotype_from = 'DARTS_V2'", "epochs = 8000", "batch_size = 64", "learning_rate = 20.0",
                  "weight_decay = 8e-07", "grad_clip = 0.25", "nonmono = 5", "emsize = 850", "nhid = 850",
                  "dropout = 0.75", "dropouth = 0.25", "dropoutx = 0.75", "dropouti = 0.2", "dropoute = 0.1",
                  "bptt = 35", "test_batch_size = 1"),
    "cnn_train": ("genotype_from = 'DARTS_V2'", "epochs = 600", "batch_size = 96", "learning_rate = 0.025",
                  "momentum = 0.9", "weight_decay = 0.0003", "grad_clip = 5.0", "auxiliary = True",
                  "auxiliary_weight = 0.4", "drop_path_prob = 0.2", "cutout_size = 16", "init_channels = 36",
                  "layers = 20"),
}


def sacred_defaults(ex: Any, named: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for scope in ex.configurations:
        config.update(scope(preset=config))
    if named is not None:
        config.update(ex.named_configs[named](preset=config))
    return {key: value for key, value in config.items() if key != "__doc__"}  # Sacred's docstring key: not a value


def dataclass_defaults(module: Any) -> dict[str, tuple[str, Any]]:
    """config key -> (Class.field, default) for every field of the experiment's dataclasses that has a default."""
    found = {}
    for cls in module.CONFIGS:
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                found[module.RENAMED.get(field.name, field.name)] = (f"{cls.__name__}.{field.name}", field.default)
    return found


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sacred_default_is_its_dataclass_default(name: str) -> None:
    module = importlib.import_module(f"experiments.{name}")
    config, fields = sacred_defaults(module.ex), dataclass_defaults(module)
    shared = sorted(set(config) & set(fields))
    assert len(shared) >= 15
    differ = [f"{key} = {config[key]!r} but {fields[key][0]} = {fields[key][1]!r}" for key in shared
              if config[key] != fields[key][1] and not (isinstance(fields[key][1], tuple) and
                                                         list(fields[key][1]) == config[key])]
    assert not differ, differ


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_key_reaches_a_dataclass_or_the_run(name: str) -> None:
    module = importlib.import_module(f"experiments.{name}")
    unused = set(sacred_defaults(module.ex)) - set(dataclass_defaults(module)) - RUN_KEYS
    assert not unused, f"{name}: config keys nothing reads: {sorted(unused)}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_with_paper_is_the_defaults(name: str) -> None:
    ex = importlib.import_module(f"experiments.{name}").ex
    assert sacred_defaults(ex, "paper") == sacred_defaults(ex)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("args", [(), ("with", "paper")], ids=["defaults", "paper"])
def test_print_config_shows_the_papers_values(name: str, args: tuple[str, ...], tmp_path: Path) -> None:
    assert_printed_config(name, args, PAPER_VALUES[name], tmp_path / "runs")


def test_a_checkpoint_from_before_a_key_was_added_resumes_only_with_the_old_behaviour() -> None:
    from experiments.tracking.config import check_resume_config
    from shared.errors import ConfigError

    saved = {"seed": 3, "learning_rate": 5.0}  # written before vocab_size / min_frequency / strategy existed
    check_resume_config(saved, {**saved, "vocab_size": None, "min_frequency": 1})
    check_resume_config({**saved, "C": 16}, {**saved, "C": 16})  # an experiment without the added keys
    with pytest.raises(ConfigError, match="min_frequency: checkpoint 1, now 2"):
        check_resume_config(saved, {**saved, "vocab_size": None, "min_frequency": 2})
    with pytest.raises(ConfigError, match="strategy: checkpoint None, now 'random'"):
        check_resume_config(saved, {**saved, "strategy": "random"})


def test_sacreds_docstring_key_stays_out_of_the_run_values_and_so_out_of_checkpoints() -> None:
    from experiments.tracking.config import check_resume_config, run_values

    values = run_values({"seed": 3, "__doc__": "About a minute", "data_dir": 123})
    assert values == {"seed": 3, "data_dir": "123"}
    check_resume_config({"seed": 3}, run_values({"seed": 3, "__doc__": "a docstring edited since"}))
