"""Every bad input a user can give the six entry points (four experiments, report, reproduce) is refused with its exit
code and exactly one error line that names the key or file, and no earlier run folder or checkpoint changes.

The experiments run in this process (`ex.run_commandline`, the path `python -m` takes) so that 50-odd cases cost
seconds: most are refused before any run starts. The earlier runs they point at are made once, in subprocesses."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import reproduce
from experiments.report import main as report_main
from shared.genotypes import published, to_dict
from tests.cnn_darts.test_data import _fake_objects, _pickled, _write
from tests.conftest import run_experiment
from tests.experiments.conftest import TINY, TRAIN_TINY, tiny_data
from tests.rnn_darts.test_search import write_corpus

# All 100 generated images (6 steps an epoch, not 2): test_faults runs ARGS and kills each at step 1 to 4 of epoch 2.
CNN_TINY = (*TINY["cnn"], "train_images=None")
ARGS = {"rnn_search": ("with", "smoke", "data_dir={ptb}", *TINY["rnn"]),
        "cnn_search": ("with", "smoke", "data_dir={cifar}", *CNN_TINY),
        "rnn_train": ("with", "smoke", "data_dir={ptb}", *TRAIN_TINY["rnn"]),
        "cnn_train": ("with", "smoke", "data_dir={cifar}", *TRAIN_TINY["cnn"])}
# Sacred's own log lines (run start, failure time) and the warning sacred's import raises are not error lines.
NOT_ERROR = re.compile(r"^(INFO|WARNING|DEBUG) - |^ERROR - \S+ - Failed after|pkg_resources|^\s*import pkg_resources")

# (entry point, arguments after its defaults, text the one error line must hold)
CASES = [
    # rnn_search: types, ranges, choices, unknown keys, paths, memory, resume
    ("rnn_search", ["order=fifth"], "order must be one of"),
    ("rnn_search", ["strategy=evolution"], "strategy must be one of"),
    ("rnn_search", ["threads=-1"], "threads must be 0"),
    ("rnn_search", ["weight_decay=-1"], "weight_decay must be >= 0"),
    ("rnn_search", ["arch_weight_decay=-1"], "arch_weight_decay must be >= 0"),
    ("rnn_search", ["beta=-5"], "beta must be >= 0"),
    ("rnn_search", ["device=None"], "device must be a string"),
    ("rnn_search", ["device=tpu"], "device must be 'auto', 'cpu' or 'cuda[:N]'"),
    ("rnn_search", ["learning_rate=nan"], "learning_rate must be a finite number"),
    ("rnn_search", ["learning_rate=inf"], "learning_rate must be a finite number"),
    ("rnn_search", ["batch_size=32.5"], "batch_size must be an integer"),
    ("rnn_search", ["bptt=2.5"], "bptt must be an integer"),
    ("rnn_search", ["seed=-1"], "seed must be an integer in [0, 2**63)"),
    ("rnn_search", ["eval_tokens=-1"], "eval_tokens must be a positive number of tokens"),
    ("rnn_search", ["train_tokens=abc"], "train_tokens must be an integer or None"),
    ("rnn_search", ["epochs=0"], "epochs must be a positive integer"),
    ("rnn_search", ["time_limit=-5"], "time_limit must be a positive number of minutes"),
    ("rnn_search", ["emsize=0", "nhid=0"], "emsize must be a positive integer"),
    ("rnn_search", ["dropout=1.5"], "dropout must be in [0, 1)"),
    ("rnn_search", ["arch_data=train", "arch_fraction=2"], "arch_fraction must be in (0, 1)"),
    ("rnn_search", ["eval_batch_size=1"], "must be >= 2"),
    ("rnn_search", ["decoder_bias=ones"], "decoder_bias must be zero or unigram"),
    ("rnn_search", ["hessian_every=-1"], "hessian_every must be an integer >= 0"),
    ("rnn_search", ["early_stop=maybe"], "early_stop must be one of"),
    ("rnn_search", ["select_cells=0"], "select_cells must be a positive integer"),
    ("rnn_search", ["strategy=reinforce", "controller_lr=-1"], "controller_lr must be positive"),
    ("rnn_search", ["vocab_size=0"], "vocab_size must be a positive number of words"),
    ("rnn_search", ["min_frequency=0"], "min_frequency must be >= 1"),
    ("rnn_search", ["bogus=1"], "unknown config key 'bogus'"),
    ("rnn_search", ["lerning_rate=3"], "did you mean learning_rate?"),
    ("rnn_search", ["smok"], 'Named config not found: "smok". Available config values are'),
    ("rnn_search", ["RUNS={file}/runs"], "runs folder"),  # the runs folder under a file
    ("cnn_train", ["RUNS=/proc/darts-runs"], "runs folder"),  # where nothing can be written
    ("rnn_search", ["steps=100000"], "lower emsize, nhid or steps"),
    ("rnn_search", ["data_dir=123"], "123"),
    ("rnn_search", ["data_dir={file}"], "is a file, not a folder"),
    ("rnn_search", ["resume="], "resume must be a run folder or checkpoint.pt"),
    ("rnn_search", ["resume={nowhere}"], "does not exist"),
    ("rnn_search", ["resume={cnn_run}"], "is a cnn_search checkpoint, not a rnn_search one"),
    ("rnn_search", ["resume={garbage}"], "is not a checkpoint this toolkit wrote"),
    ("rnn_search", ["resume={rnn_run}", "learning_rate=7"], "the config differs from the checkpoint's"),
    ("rnn_search", ["resume={rnn_run}", "data_dir={ptb_other}"], "vocabulary"),
    # cnn_search
    ("cnn_search", ["momentum=-1"], "momentum must be >= 0"),
    ("cnn_search", ["layers=0"], "layers must be a positive integer"),
    ("cnn_search", ["init_channels=2.5"], "init_channels must be an integer"),
    ("cnn_search", ["init_channels=5"], "init_channels must be even"),
    ("cnn_search", ["learning_rate_min=1"], "learning_rate_min must be in [0, learning_rate]"),
    ("cnn_search", ["train_portion=1"], "train_portion must be in (0, 1)"),
    ("cnn_search", ["train_images=-3"], "train_images must be >= 1"),
    ("cnn_search", ["data_dir={nowhere}"], "nowhere"),
    ("cnn_search", ["resume={rnn_run}"], "is a rnn_search checkpoint, not a cnn_search one"),
    ("cnn_search", ["resume={cnn_run}", "data_dir={cifar_other}"], "training data"),
    # rnn_train
    ("rnn_train", ["genotype_from=123"], "123"),
    ("rnn_train", ["genotype_from=DARTS_V9"], "DARTS_V9"),
    ("rnn_train", ["genotype_from={fractional_genotype}"], "fractional.json"),
    ("rnn_train", ["genotype_from={cnn_genotype}"], "cnn.json"),
    ("rnn_train", ["resume={rnn_run}"], "is a rnn_search checkpoint, not a rnn_train one"),
    ("rnn_train", ["nonmono=-1"], "nonmono must be positive"),
    ("rnn_train", ["max_seq_len_delta=-1"], "max_seq_len_delta must be >= 0"),
    ("rnn_train", ["test_batch_size=0"], "test_batch_size must be positive"),
    # cnn_train
    ("cnn_train", ["drop_path_prob=1.0"], "drop_path_prob must be in [0, 1)"),
    ("cnn_train", ["auxiliary_weight=-1"], "auxiliary_weight must be >= 0"),
    ("cnn_train", ["cutout_size=-1"], "cutout_size must be >= 0"),
    ("cnn_train", ["genotype_from={rnn_genotype}"], "rnn.json"),
    ("cnn_train", ["auxiliary=maybe"], "auxiliary must be true or false"),
    # report
    ("report", ["{nowhere}", "--out", "{out}"], "nowhere does not exist"),
    ("report", ["{rnn_run}", "--out", "{file}/report"], "cannot write the report"),
    ("report", ["{rnn_run}", "--out", "{out}", "--stale-after", "-1"], "--stale-after must be a positive number"),
    ("report", ["{rnn_run}", "--out", "{out}", "--stale-after", "soon"], "--stale-after"),
    ("report", ["{rnn_run}"], "--out"),
    # reproduce
    ("reproduce", ["{nowhere}"], "nowhere"),
    ("reproduce", ["{file}"], "file.txt"),
    ("reproduce", ["{broken_run}"], "run.json"),
    ("reproduce", ["{rnn_run}", "--runs-dir", "{file}/runs"], "runs"),
    ("reproduce", [], "run_dir"),
]


def snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file below `folders`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data, earlier runs of both searches, and broken files for the cases to point at."""
    root = tmp_path_factory.mktemp("world")
    paths = {"ptb": tiny_data("rnn", root), "ptb_other": write_corpus(root / "ptb_other", words=31, seed=1),
             "cifar": tiny_data("cnn", root),
             "cifar_other": _write(root / "cifar10_other", "folder", _pickled(_fake_objects(seed=1))),
             "nowhere": root / "nowhere", "file": root / "file.txt", "garbage": root / "garbage.pt",
             "broken_run": root / "broken" / "1", "fractional_genotype": root / "fractional.json",
             "cnn_genotype": root / "cnn.json", "rnn_genotype": root / "rnn.json"}
    paths["file"].write_text("not a folder\n")
    paths["garbage"].write_bytes(b"\x80\x04garbage that is no zip file")
    paths["broken_run"].mkdir(parents=True)
    (paths["broken_run"] / "run.json").write_text("{ half a record")
    rnn = to_dict(published("rnn", "DARTS_V2"))
    rnn["recurrent"][0][1] = 0.9
    paths["fractional_genotype"].write_text(json.dumps(rnn))
    paths["cnn_genotype"].write_text(json.dumps(to_dict(published("cnn", "DARTS_V2"))))
    paths["rnn_genotype"].write_text(json.dumps(to_dict(published("rnn", "DARTS_V2"))))
    for name, args in (("rnn_search", ("with", "smoke", f"data_dir={paths['ptb']}", *TINY["rnn"], "epochs=1")),
                       # stopped after its first epoch by a time limit, so that a resume has an epoch left
                       ("cnn_search", ("with", "smoke", f"data_dir={paths['cifar']}", *CNN_TINY, "time_limit=1e-6"))):
        result = run_experiment(name, *args, runs=root / f"{name}_runs")
        assert result.returncode == 0, result.stderr
        paths[f"{name.split('_')[0]}_run"] = result.run_dir()
    return paths


def run_entry(entry: str, args: list[str], runs: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run one entry point in this process as its command line would; returns the exit code."""
    monkeypatch.setenv("DARTS_RUNS_DIR", str(runs))
    threads = torch.get_num_threads()  # a run that starts sets threads and seeds: give this process its own back
    try:
        if entry == "report":
            return report_main(args)
        if entry == "reproduce":
            return reproduce.main(args)
        ex = importlib.import_module(f"experiments.{entry}").ex
        monkeypatch.setattr(ex, "observers", [])  # a run's observers are attached afresh (DARTS_RUNS_DIR above)
        ex.run_commandline([entry, *args])
    except SystemExit as exit_:  # argparse's and Sacred's way out
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return 0


@pytest.mark.parametrize(("entry", "args", "message"), CASES, ids=[f"{e}-{' '.join(a)}" for e, a, _ in CASES])
def test_a_bad_input_is_one_line_naming_it_and_changes_no_earlier_run(
        entry: str, args: list[str], message: str, world: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    values: dict[str, Any] = {**world, "out": tmp_path / "report"}
    full = [part.format(**values) for part in (*ARGS.get(entry, ()), *args) if not part.startswith("RUNS=")]
    runs = next((Path(a[5:].format(**values)) for a in args if a.startswith("RUNS=")), tmp_path / "runs")
    earlier = [world["rnn_run"].parent, world["cnn_run"].parent]
    before = snapshot(earlier)
    capfd.readouterr()
    with torch.random.fork_rng():
        code = run_entry(entry, full, runs, monkeypatch)
    err = capfd.readouterr().err
    assert code == (2 if entry in ("report", "reproduce") else 1), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not NOT_ERROR.search(line)]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert snapshot(earlier) == before


def test_there_are_at_least_fifty_bad_inputs_across_the_six_entry_points() -> None:
    assert len(CASES) >= 50
    assert {entry for entry, _, _ in CASES} == {"rnn_search", "cnn_search", "rnn_train", "cnn_train", "report",
                                                 "reproduce"}
