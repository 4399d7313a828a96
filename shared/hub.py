"""What the data loaders of both spaces share: where a dataset's folder is, whether the Hugging Face hub may be
tried, a hub download that fails in seconds and in one line, and one-line error text."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.errors import DataError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads its boolean variables
PROBE_TIMEOUT_S = 5.0  # an offline machine must fail in seconds, not after minutes of retries


def data_folder(data_dir: str | os.PathLike[str] | None, name: str, holds: Callable[[Path], bool]) -> Path:
    """`data_dir` if given; else $DARTS_DATA_DIR when `holds` it (the dataset's files directly in it), else its
    subfolder `name`; else ./data/`name`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DARTS_DATA_DIR")
    if env:
        root = Path(env).expanduser()
        return root if holds(root) else root / name
    return Path("data") / name


def offline_reason() -> str | None:
    """'HF_HUB_OFFLINE is set' (or the datasets variable) when the user asked for no network, else None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in TRUE_VALUES:
            return f"{var} is set"
    return None


def hub_skip_reason(name: str) -> str | None:
    """Why the hub must not be tried for dataset `name` now (offline, or no answer to a metadata request within
    PROBE_TIMEOUT_S), or None to go ahead."""
    reason = offline_reason()
    if reason is not None:
        return reason
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # no network, DNS failure, unknown or gated repository: all mean "do not try"
        return f"the hub gave no answer for {name!r} ({type(error).__name__}: {one_line(error)})"
    return None


def load_hub_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset(name)` (or `load_dataset(*args, **kwargs)` for files of the hub repository `name`)
    without progress bars; DataError (one line) when it fails or may not be tried."""
    reason = hub_skip_reason(name)
    if reason is not None:
        raise DataError(f"the hub was skipped: {reason}")
    import datasets  # deferred: importing it costs about a second

    try:
        with quiet_progress_bars():
            return datasets.load_dataset(*(args or (name,)), **kwargs)
    except Exception as error:  # network drops, missing splits, scripts no longer supported, cache permissions...
        raise DataError(f"downloading {name!r} from the hub failed ({type(error).__name__}: {one_line(error)})"
                        ) from error


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence the datasets progress bars for one call, then restore the caller's setting."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
