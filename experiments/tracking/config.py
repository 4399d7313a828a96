"""The config every experiment shares, and the bridge from a run's config to the dataclasses it fills."""
from __future__ import annotations

import difflib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError
from shared.validation import check_fields


# Config scopes the experiments add to their own (`ex.config(...)`, after their own so that its comments win).
# Comments here become `print_config`'s; a docstring would print as the whole config's.
def common_config() -> None:  # the keys every search and training shares, with one meaning everywhere
    device = "auto"  # auto | cpu | cuda | cuda:N
    threads = 0  # torch CPU threads (0: torch's default)
    resume = None  # a run folder or checkpoint.pt to continue from in a new run (README: which keys may change)
    time_limit = None  # minutes (a batch job's limit): start no epoch the longest so far would carry past it; resume=
    tensorboard = False  # also write every metric as TensorBoard event files to the run folder's tensorboard/
    sync_batch_norm = False  # torchrun: BatchNorm statistics over all processes' batches, as one process (slower)


@dataclass(frozen=True)
class RunConfig:
    """The keys every search and training reads itself (their defaults and comments are in the config scopes:
    `common_config` and each experiment's own), checked like the dataclasses an experiment fills."""

    seed: int
    epochs: int
    device: str
    threads: int
    resume: str | None
    time_limit: float | None
    data_dir: str | None
    tensorboard: bool
    sync_batch_norm: bool

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (torch's default) or a positive integer, got {self.threads}")
        # An empty value (a batch script's unset variable) must fail, not start the run again from zero.
        if self.resume is not None and not self.resume.strip():
            raise ConfigError(f"resume must be a run folder or checkpoint.pt, got {self.resume!r}: pass one to "
                              f"continue, or leave resume out (None) for a fresh run")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise ConfigError(f"time_limit must be a positive number of minutes or None, got {self.time_limit!r}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install "
                              "'darts-toolkit[tensorboard]', or leave tensorboard off")


SACRED_DOC = "__doc__"  # Sacred's own key: a named config's docstring, which print_config shows above the config

# Keys that name files or folders: Sacred reads `data_dir=123` (a folder named like a number) as an int.
PATH_KEYS = ("data_dir", "resume", "genotype_from")


def scope_keys(ex: Any) -> set[str]:
    """Every key the experiment's config scopes define (Sacred adds `seed` where none does)."""
    config: dict[str, Any] = {}
    for scope in ex.configurations:
        config.update(scope(preset=config))
    return set(config) | {"seed"}


def run_values(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as the experiment reads it (and its checkpoints keep): the path keys given as numbers
    (`data_dir=123`) as strings, without Sacred's docstring key (a docstring edit must not block a resume)."""
    return {**{key: value for key, value in config.items() if key != SACRED_DOC},
            **{key: str(config[key]) for key in PATH_KEYS
               if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}}


def check_config(config: dict[str, Any], known: set[str], configs: tuple[Any, ...], renamed: dict[str, str]
                 ) -> None:
    """Validate a run's config before anything runs: no unknown key, and every dataclass in `configs` accepts its
    values (types, ranges, relations)."""
    values = run_values(config)
    unknown = sorted(set(values) - known - {SACRED_DOC})
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {unknown[0]!r}{hint}; the keys are: {', '.join(sorted(known))}")
    for cls in configs:
        try:
            cls(**config_values(cls, values, renamed))
        except ConfigError as error:  # a renamed field's message speaks of the config key the user typed
            field = str(error).split(" ", 1)[0].rstrip(",:")
            if field in renamed:
                raise ConfigError(renamed[field] + str(error)[len(field):]) from None
            raise


def paper() -> None:
    """The paper's configuration, which is every experiment's default (the tests check it): changes nothing."""


def config_values(cls: Any, config: dict[str, Any], renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """The values of dataclass `cls`'s fields in a run's config; `renamed` maps a field to its config key where
    the two differ (e.g. ninp -> emsize). Fields the config does not hold (sizes read from the data) are the
    caller's to add."""
    renamed = renamed or {}
    keys = {name: renamed.get(name, name) for name in cls.__dataclass_fields__}
    return {name: config[key] for name, key in keys.items() if key in config}


def search_config() -> None:  # what both searches share besides the collapse and controller keys
    precision = "fp32"  # fp32 | bf16: bf16 autocast in the weight step and the validation passes (docs/engine.md)
    compile = "off"  # off | a torch.compile mode: default, reduce-overhead (CUDA graphs), ... (docs/engine.md)


def collapse_config() -> None:  # the collapse diagnostics and early stopping of every search (shared.collapse)
    hessian_every = 2  # the dominant eigenvalue of the alpha Hessian (RobustDARTS) every N epochs; 0: never
    hessian_iterations = 20  # cost cap: Hessian-vector products per measurement (Lanczos)
    hessian_tol = 1e-3  # stop a measurement once its relative residual is below this
    early_stop = "off"  # off | robust (eigenvalue growth, RobustDARTS) | skip (parameter-free op count, DARTS+)
    early_stop_factor = 1.3  # robust: stop when the eigenvalue's local average grew by more than this factor
    early_stop_start = 10  # robust: the epoch returned (the earlier window's middle) is at least this one
    early_stop_window = 5  # robust: measurements per local average
    early_stop_delta = 4  # robust: compare with the local average this many measurements earlier
    early_stop_skips = 2  # skip: stop once the cell holds this many skip_connect (CNN normal cell) / identity (RNN)


def controller_config() -> None:  # strategy=reinforce: the REINFORCE controller (shared.controller)
    controller_hidden = 64  # reinforce: the controller's LSTM cell size
    controller_lr = 3.5e-4  # reinforce: Adam on the controller (ENAS)
    controller_every = 10  # reinforce: one controller step after this many shared-weight steps
    controller_samples = 4  # reinforce: cells sampled and rewarded per controller step
    entropy_weight = 1e-4  # reinforce: bonus on the controller's entropy (ENAS)
    baseline_decay = 0.95  # reinforce: the reward's moving average, subtracted as baseline


def corpus_config() -> None:  # the corpus of the recurrent-cell experiments (rnn_darts.data)
    data_dir = None  # folder with ptb.train.txt / ptb.valid.txt / ptb.test.txt; None: $DARTS_DATA_DIR, ./data/ptb, hub
    vocab_size = None  # keep only the N most frequent training words (others read as <unk>); None: all
    min_frequency = 1  # keep only training words seen at least this often


def image_config() -> None:  # the images of the convolutional-cell experiments (cnn_darts.data.ImageDataConfig)
    data_dir = None  # CIFAR-10 python files (tarball, batches folder or files); None: $DARTS_DATA_DIR, ./data, hub
    dataset = "cifar10"  # cifar10 (python files in data_dir, else the hub), or a `datasets` saved folder or hub name
    image_column = None  # another dataset's image column; None: its first Image column (else img, image)
    label_column = None  # another dataset's label column; None: its first ClassLabel column (else label, labels)
    train_split = "train"  # another dataset's split that the search or training reads
    test_split = None  # another dataset's held-out split; None: test, else validation


def add_shared_config(ex: Any, search: bool, corpus: bool = False, images: bool = False) -> None:
    """Register the shared scopes on an experiment, after its own config (so its comments win): the common keys,
    the corpus keys for the RNN experiments and the image keys for the CNN ones, for a search the collapse and
    controller keys, and the `paper` named config."""
    ex.config(common_config)
    if corpus:
        ex.config(corpus_config)
    if images:
        ex.config(image_config)
    if search:
        ex.config(search_config)
        ex.config(collapse_config)
        ex.config(controller_config)
    ex.named_config(paper)


# Keys that may differ between a run and the run that resumes it (a search whose schedule spans `epochs` removes it).
# The collapse keys only measure and stop: they change nothing a finished epoch computed.
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "device", "data_dir", "threads", "time_limit", "tensorboard",
                               "sync_batch_norm", "precision", "compile",
                               *collapse_config.__code__.co_varnames})


# Keys added after runs were recorded, with the value every earlier run behaved as.
ADDED_KEYS = {"vocab_size": None, "min_frequency": 1, "dataset": "cifar10", "image_column": None, "label_column": None,
              "train_split": "train", "test_split": None, "precision": "fp32",
              "compile": "off"}


def check_resume_config(saved: dict[str, Any], current: dict[str, Any],
                        may_change: frozenset[str] = RESUMABLE_CHANGES) -> None:
    """A resumed run must continue the same search: every other config value must match the checkpoint's. A key
    added to the toolkit since the checkpoint was written counts as the value that keeps the old behaviour."""
    saved = {**{key: value for key, value in ADDED_KEYS.items() if key in current}, **saved}
    keys = (set(saved) | set(current)) - may_change
    differ = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"resume: the config differs from the checkpoint's ({shown}); "
                          f"pass the original run's named configs and values along with resume=")
