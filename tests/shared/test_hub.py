"""The data plumbing both spaces share: the offline reading, the data folder, one-line hub failures."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared import hub
from shared.errors import DataError


@pytest.mark.parametrize("value, offline", [("1", True), ("yes", True), ("TRUE", True), (" on ", True),
                                            ("0", False), ("", False), ("false", False), ("off", False)])
def test_both_loaders_read_the_offline_variables_as_huggingface_hub_does(monkeypatch, value: str,
                                                                          offline: bool) -> None:
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert (hub.offline_reason() == "HF_HUB_OFFLINE is set") is offline


def test_an_offline_machine_skips_the_hub_without_a_request(monkeypatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: pytest.fail("no request offline"))
    with pytest.raises(DataError, match="the hub was skipped: HF_DATASETS_OFFLINE is set"):
        hub.load_hub_dataset("some/dataset")


def test_a_failing_download_is_one_line(monkeypatch) -> None:
    import datasets
    import huggingface_hub

    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: None)

    def scripts_gone(name, *args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported,\nbut found ptb_text_only.py")

    monkeypatch.setattr(datasets, "load_dataset", scripts_gone)
    with pytest.raises(DataError) as info:
        hub.load_hub_dataset("ptb-text-only/ptb_text_only")
    assert "\n" not in str(info.value) and "Dataset scripts are no longer supported" in str(info.value)


def test_data_folder_prefers_the_argument_then_the_variable_then_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DARTS_DATA_DIR", raising=False)
    assert hub.data_folder(None, "ptb", lambda root: False) == Path("data/ptb")
    monkeypatch.setenv("DARTS_DATA_DIR", str(tmp_path))
    assert hub.data_folder(None, "ptb", lambda root: False) == tmp_path / "ptb"
    assert hub.data_folder(None, "ptb", lambda root: True) == tmp_path
    assert hub.data_folder(str(tmp_path / "x"), "ptb", lambda root: True) == tmp_path / "x"
