"""The CIFAR-10 search as a user runs it: records, artifacts, resume, one-line errors, real data (the printed config:
test_configs.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shared.genotypes import CNNGenotype, load
from tests.cnn_darts.test_data import _fake_objects, _pickled, _write
from tests.conftest import real_data, run_experiment
from tests.experiments.conftest import TINY, tiny_search


def test_a_search_records_curves_genotypes_alphas_and_checkpoint(tmp_path: Path) -> None:
    result = tiny_search("cnn", tmp_path, "epochs=2")
    assert result.returncode == 0, result.stderr
    run, metrics, folder = result.run_json(), result.metrics(), result.run_dir()
    assert run["status"] == "COMPLETED"
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc", "skip_connect_normal", "epoch_time"):
        assert metrics[name]["steps"] == [1, 2], name
        assert all(math.isfinite(v) for v in metrics[name]["values"]), name
    assert all(0 <= v <= 1 for v in metrics["valid_acc"]["values"])
    genotype = load(folder / "genotype.json")
    assert isinstance(genotype, CNNGenotype) and len(genotype.normal) == len(genotype.reduce) == 4  # 2 nodes x 2
    info = json.loads((folder / "info.json").read_text())
    assert [g["epoch"] for g in info["genotype_history"]] == [1, 2]
    alphas = json.loads((folder / "alphas.json").read_text())[-1]["alphas"]
    assert set(alphas) == {"alphas_normal", "alphas_reduce"}
    assert all(len(rows) == 5 and sum(rows[0]) == pytest.approx(1.0) for rows in alphas.values())  # 2 + 3 edges
    assert (folder / "checkpoint.pt").is_file()
    assert "stopped_early" not in info
    assert run["result"] == info["result"]["valid_acc"] == metrics["valid_acc"]["values"][-1]  # the headline


def test_resume_continues_in_a_new_run_equal_to_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = tiny_search("cnn", tmp_path, "epochs=2", runs=tmp_path / "whole")
    first = tiny_search("cnn", tmp_path, "epochs=2", "time_limit=1e-9")  # stops after its first epoch
    assert whole.returncode == 0 and first.returncode == 0, whole.stderr + first.stderr
    assert first.metrics(1)["valid_acc"]["steps"] == [1]
    resumed = tiny_search("cnn", tmp_path, "epochs=2", f"resume={first.run_dir(1)}")
    assert resumed.returncode == 0, whole.stderr + first.stderr + resumed.stderr
    for name in ("train_loss", "valid_loss", "valid_acc"):
        assert resumed.metrics(2)[name]["values"] == whole.metrics()[name]["values"], name
    assert resumed.result(2)["genotype"] == whole.result()["genotype"]


def test_resume_may_not_change_the_length_of_the_cosine_schedule(tmp_path: Path) -> None:
    first = tiny_search("cnn", tmp_path, "epochs=1")
    assert first.returncode == 0, first.stderr
    result = tiny_search("cnn", tmp_path, "epochs=2", f"resume={first.run_dir(1)}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "resume: the config differs from the checkpoint's (epochs: checkpoint 1, now 2)" in result.stderr


def test_missing_data_offline_is_one_line_naming_both_remedies(tmp_path: Path) -> None:
    result = run_experiment("cnn_search", "with", "smoke", f"data_dir={tmp_path / 'nowhere'}", runs=tmp_path / "runs")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "nowhere" in line]
    assert len(message) == 1 and "hub" in message[0], result.stderr
    assert result.run_json()["status"] == "FAILED"


def test_a_corrupt_batch_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    folder = _write(tmp_path / "cifar10", "folder", _pickled(_fake_objects()))
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    result = tiny_search("cnn", tmp_path, "epochs=1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "data_batch_3" in result.stderr


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_search_on_real_cifar10_completes(tmp_path: Path) -> None:
    """The smoke on the real files, on an eighth of its images (one step an epoch) and without the Hessian
    measurement (tested on generated data): the whole smoke takes 2.5 minutes on 2 cores."""
    cifar = real_data("cifar10")
    result = run_experiment("cnn_search", "with", "smoke", f"data_dir={cifar}", "train_images=64", "hessian_every=0",
                            runs=tmp_path / "runs", timeout=1200)
    assert result.returncode == 0, result.stderr
    metrics = result.metrics()
    assert metrics["valid_acc"]["steps"] == [1, 2]
    assert all(math.isfinite(v) for v in metrics["valid_loss"]["values"])
    assert isinstance(load(result.run_dir() / "genotype.json"), CNNGenotype)


# The robust rule made to fire at its first chance: one measurement a window, compared with the one before, any
# growth at all (factor 1e-6 of a positive curvature), from epoch 0.
FIRE_AT_ONCE = ("hessian_every=1", "early_stop=robust", "early_stop_start=0", "early_stop_window=1",
                "early_stop_delta=1", "early_stop_factor=1e-6")


def test_an_early_stop_ends_the_search_records_why_and_returns_the_chosen_epochs_genotype(tmp_path: Path) -> None:
    stopped = tiny_search("cnn", tmp_path, "epochs=3", *FIRE_AT_ONCE)
    assert stopped.returncode == 0, stopped.stderr
    run, metrics, folder = stopped.run_json(), stopped.metrics(), stopped.run_dir()
    info = json.loads((folder / "info.json").read_text())
    assert run["status"] == "COMPLETED"
    assert info["early_stop"]["rule"] == "robust"
    assert (info["early_stop"]["epoch"], info["early_stop"]["genotype_epoch"]) == (2, 1)
    assert "grew" in info["early_stop"]["reason"] and "stopped_early" not in info
    for name in ("hessian_eigenvalue", "hessian_iterations", "hessian_residual", "edge_entropy", "edge_entropy_min",
                 "parameter_free_normal", "parameter_free_reduce"):
        assert metrics[name]["steps"] == [1, 2], name
    assert all(v > 0 for v in metrics["hessian_eigenvalue"]["values"])
    assert all(0 < v <= math.log(8) + 1e-9 for v in metrics["edge_entropy"]["values"])
    epoch_one = info["genotype_history"][0]["genotype"]
    assert info["result"]["genotype"] == epoch_one == json.loads((folder / "genotype.json").read_text())
    assert info["result"]["early_stop"] == info["early_stop"]

    again = tiny_search("cnn", tmp_path, "epochs=3", *FIRE_AT_ONCE, f"resume={folder}")
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "resume: the search stopped early after epoch 2" in again.stderr and "early_stop=off" in again.stderr

    onward = tiny_search("cnn", tmp_path, "epochs=3", *FIRE_AT_ONCE[:1], f"resume={folder}")  # early_stop off
    assert onward.returncode == 0, onward.stderr
    info = json.loads((onward.run_dir() / "info.json").read_text())
    assert "early_stop" not in info and onward.metrics()["valid_acc"]["steps"] == [1, 2, 3]
    assert onward.result()["genotype"] == info["genotype_history"][2]["genotype"]


def test_random_search_records_the_standard_metrics_and_resumes_exactly(tmp_path: Path) -> None:
    whole = tiny_search("cnn", tmp_path, "epochs=2", "strategy=random", "select_cells=3", runs=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    metrics, folder = whole.metrics(), whole.run_dir()
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc", "skip_connect_normal", "edge_entropy"):
        assert metrics[name]["steps"] == [1, 2], name
    assert "hessian_eigenvalue" not in metrics  # no alphas are trained
    genotype = load(folder / "genotype.json")
    assert isinstance(genotype, CNNGenotype) and all(op != "none" for op, _ in genotype.normal + genotype.reduce)
    assert metrics["edge_entropy"]["values"] == [0.0, 0.0]  # the recorded alphas are the chosen one-hot cell
    first = tiny_search("cnn", tmp_path, "epochs=2", "strategy=random", "select_cells=3", "time_limit=1e-9")
    resumed = tiny_search("cnn", tmp_path, "epochs=2", "strategy=random", "select_cells=3",
                          f"resume={first.run_dir(1)}")
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr + resumed.stderr
    for name in ("train_loss", "valid_loss", "valid_acc"):
        assert resumed.metrics(2)[name]["values"] == metrics[name]["values"], name
    assert resumed.result(2)["genotype"] == whole.result()["genotype"]


def test_reinforce_search_records_the_controller_and_resumes_exactly(tmp_path: Path) -> None:
    args = ("epochs=2", "strategy=reinforce", "select_cells=3", "controller_every=2", "controller_samples=2")
    whole = tiny_search("cnn", tmp_path, *args, runs=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    metrics = whole.metrics()
    for name in ("train_loss", "valid_acc", "skip_connect_normal", "controller_reward", "controller_entropy"):
        assert metrics[name]["steps"] == [1, 2], name
    assert all(0 <= v <= 1 for v in metrics["controller_reward"]["values"])  # accuracy on an architecture batch
    genotype = load(whole.run_dir() / "genotype.json")
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)
    first = tiny_search("cnn", tmp_path, *args, "time_limit=1e-9")
    resumed = tiny_search("cnn", tmp_path, *args, f"resume={first.run_dir(1)}")
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr + resumed.stderr
    for name in ("train_loss", "valid_loss", "controller_reward", "controller_entropy"):
        assert resumed.metrics(2)[name]["values"] == metrics[name]["values"], name
    assert resumed.result(2)["genotype"] == whole.result()["genotype"]


def test_any_datasets_image_dataset_is_searched_from_the_command_line(tmp_path: Path) -> None:
    """dataset=<save_to_disk folder> with its own columns and splits: 3 classes of 16x16 images."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"])})

    def split(n: int) -> datasets.Dataset:
        images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]
        return datasets.Dataset.from_dict({"picture": images, "kind": [i % 3 for i in range(n)]}, features=features)

    datasets.DatasetDict(fit=split(32), held_out=split(12)).save_to_disk(str(tmp_path / "shapes"))
    args = ("with", "smoke", f"dataset={tmp_path / 'shapes'}", "image_column=picture", "label_column=kind",
            "train_split=fit", "test_split=held_out", *TINY["cnn"], "epochs=1")
    result = run_experiment("cnn_search", *args, runs=tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    assert "3 classes, images (3, 16, 16), 32 train, 12 test" in result.stderr
    assert 0 <= result.run_json()["result"] <= 1
    wrong = run_experiment("cnn_search", *args[:-3], "test_split=nope", *TINY["cnn"], "epochs=1",
                           runs=tmp_path / "runs")
    assert wrong.returncode != 0 and "needs a 'fit' and 'nope' split, found ['fit', 'held_out']" in wrong.stderr
    assert "Traceback" not in wrong.stderr
