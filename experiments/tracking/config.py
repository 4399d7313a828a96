"""The config every experiment shares, and the bridge from a run's config to the dataclasses it fills."""
from __future__ import annotations

from typing import Any

from shared.errors import ConfigError


# Config scopes the experiments add to their own (`ex.config(...)`, after their own so that its comments win).
# Comments here become `print_config`'s; a docstring would print as the whole config's.
def common_config() -> None:  # the keys every search and training shares, with one meaning everywhere
    device = "auto"  # auto | cpu | cuda | cuda:N
    threads = 0  # torch CPU threads (0: torch's default)
    resume = None  # a run folder or checkpoint.pt to continue from in a new run (README: which keys may change)
    time_limit = None  # minutes (a batch job's limit): start no epoch the longest so far would carry past it; resume=


def paper() -> None:  # a named config: the paper's configuration is every experiment's default (tests check it)
    pass  # so `with paper` is a valid command line that changes nothing


def config_values(cls: Any, config: dict[str, Any], renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """The values of dataclass `cls`'s fields in a run's config; `renamed` maps a field to its config key where
    the two differ (e.g. ninp -> emsize). Fields the config does not hold (sizes read from the data) are the
    caller's to add."""
    renamed = renamed or {}
    keys = {name: renamed.get(name, name) for name in cls.__dataclass_fields__}
    return {name: config[key] for name, key in keys.items() if key in config}


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


def add_shared_config(ex: Any, search: bool) -> None:
    """Register the shared scopes on an experiment, after its own config (so its comments win): the common keys,
    for a search the collapse and controller keys, and the `paper` named config."""
    ex.config(common_config)
    if search:
        ex.config(collapse_config)
        ex.config(controller_config)
    ex.named_config(paper)


# Keys that may differ between a run and the run that resumes it (a search whose schedule spans `epochs` removes it).
# The collapse keys only measure and stop: they change nothing a finished epoch computed.
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "device", "data_dir", "threads", "time_limit",
                               *collapse_config.__code__.co_varnames})


def check_resume_config(saved: dict[str, Any], current: dict[str, Any],
                        may_change: frozenset[str] = RESUMABLE_CHANGES) -> None:
    """A resumed run must continue the same search: every other config value must match the checkpoint's."""
    keys = (set(saved) | set(current)) - may_change
    differ = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"resume: the config differs from the checkpoint's ({shown}); "
                          f"pass the original run's named configs and values along with resume=")
