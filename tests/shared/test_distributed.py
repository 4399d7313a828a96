"""Data-parallel runs: two gloo processes search like one process on the same global batch, and stay identical;
batch statistics over all processes are BatchNorm's, differentiable twice; shards and torchrun's variables."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shared import distributed
from shared.errors import ConfigError
from shared.sync_batch_norm import SyncedBatchNorm, synced_batch_norm
from tests import distributed_worker
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(module: str, args: list[str], world_size: int, timeout: float = 300) -> None:
    """Run `python -m module ARGS` as `world_size` processes of one gloo group, as torchrun would set them up."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(world_size)]
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank}:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[int, dict]:
    """What every case of the worker ended with, in each of two processes."""
    folder = tmp_path_factory.mktemp("distributed")
    launch("tests.distributed_worker", [str(folder)], world_size=2)
    return {rank: torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)}


@pytest.mark.parametrize("case", distributed_worker.CASES, ids="-".join)
def test_two_processes_search_and_train_as_one_on_the_same_global_batch(two_processes, case, tmp_path) -> None:
    alone = distributed_worker.run_case(*case, distributed_worker.write_corpus(tmp_path / "corpus"))
    first, second = two_processes[0][case], two_processes[1][case]
    for name, tensor in first["state"].items():  # the processes are bit-identical
        assert torch.equal(tensor, second["state"][name]), name
    for name, tensor in alone["state"].items():  # and one process on the whole batch ends where they do
        assert torch.allclose(first["state"][name].double(), tensor.double(), rtol=0, atol=1e-5), name
    assert first["genotype"] == second["genotype"] == alone["genotype"]
    assert first["metrics"] == pytest.approx(alone["metrics"], rel=1e-5)  # the processes' shards add up
    moved = max(float((a - b).abs().max()) for a, b in zip(alone["final"], alone["initial"]))
    assert moved > 5e-4  # the steps changed the alphas (weights): the comparison is not of untouched values


def test_an_error_of_process_0_reading_a_checkpoint_reaches_every_process(two_processes) -> None:
    assert two_processes[0]["from_main"] == two_processes[1]["from_main"]
    assert "absent.pt does not exist" in two_processes[1]["from_main"]


# ---- batch statistics over all processes ----------------------------------------------------------------------
@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo group of one process, seen as 'several' by `shared.distributed` (the sum over one process is its own
    statistics: SyncedBatchNorm's result must be BatchNorm's)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(distributed, "_current", replace(distributed.Processes(), world_size=2, backend="gloo"))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("affine, track", [(True, True), (False, False)])
def test_synced_batch_norm_is_batch_norm_with_its_gradients_and_running_statistics(one_process_group, affine,
                                                                                    track) -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, affine=affine, track_running_stats=track).double()
    if affine:
        nn.init.uniform_(plain.weight, 0.5, 1.5), nn.init.uniform_(plain.bias, -1, 1)
    synced = synced_batch_norm(nn.Sequential(nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
                                                         .double()))
    synced.load_state_dict({f"0.{k}": v for k, v in plain.state_dict().items()})
    assert isinstance(synced[0], SyncedBatchNorm)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
    for _ in range(2):  # running statistics move twice alike
        expected, got = plain(x), synced(x)
        torch.testing.assert_close(got, expected)
    grads = [torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), x)[0]
             for out in (plain(x), synced(x))]
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(dict(synced[0].state_dict()), dict(plain.state_dict()))
    assert torch.autograd.gradgradcheck(lambda t: synced(t), (x.detach()[:2, :, :2, :2].requires_grad_(),))


def test_synced_batch_norm_in_eval_mode_uses_running_statistics(one_process_group) -> None:
    batch_norm = synced_batch_norm(nn.BatchNorm1d(2)).eval()
    batch_norm.running_mean.fill_(1.0)
    torch.testing.assert_close(batch_norm(torch.ones(3, 2)), torch.zeros(3, 2), atol=1e-4, rtol=0)


def test_gradients_are_averaged_in_one_collective(one_process_group) -> None:
    tensors = [torch.full((2, 2), 4.0), torch.full((3,), 2.0)]
    distributed.average_(tensors)  # one process seen as two: the sum over it, halved
    assert torch.equal(tensors[0], torch.full((2, 2), 2.0)) and torch.equal(tensors[1], torch.full((3,), 1.0))


# ---- shards and the environment -----------------------------------------------------------------------------------
def test_a_global_batch_is_split_into_equal_contiguous_shards(monkeypatch) -> None:
    assert distributed.shard(8, "batch_size") == slice(0, 8)  # one process: everything
    monkeypatch.setattr(distributed, "_current", distributed.Processes(rank=2, world_size=4))
    assert distributed.shard(8, "batch_size") == slice(4, 6)
    with pytest.raises(ConfigError, match=r"batch_size=6 does not split evenly over 4 processes: use a multiple of 4"):
        distributed.shard(6, "batch_size")


def test_torchrun_variables_are_read_and_checked(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == distributed.Processes()  # no torchrun: one process
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() == distributed.Processes(rank=1, world_size=2, local_rank=1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        distributed.launched()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="RANK='one' is not an integer"):
        distributed.launched()


def test_one_process_needs_no_process_group() -> None:
    tensors = [torch.ones(2)]
    distributed.average_(tensors)
    assert torch.equal(tensors[0], torch.ones(2))
    assert distributed.totals([1.0, 2.0]) == [1.0, 2.0] and distributed.broadcast("x") == "x"
    assert distributed.from_main(lambda: 3) == 3 and distributed.gather(5) == [5]

