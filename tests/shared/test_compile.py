"""`compile=MODE` (shared.compiled and the engine): the model compiled, the same hypergradients, the Hessian
measurement eager, evaluation eager under CUDA graphs."""
from __future__ import annotations

import importlib
from contextlib import nullcontext

import pytest
import torch

from shared.bilevel import Bilevel, BilevelConfig
from shared.compiled import compile_model, compile_unit
from shared.errors import ConfigError
from shared.sync_batch_norm import SyncedBatchNorm
from tests.shared.test_bilevel import MixedNet


def _engine(compile: str, order: str = "second") -> tuple[Bilevel, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = MixedNet(batchnorm=True).double()
    weights = [p for n, p in model.named_parameters() if n != "alphas"]
    engine = Bilevel(model, torch.optim.SGD(weights, lr=0.3, momentum=0.9), torch.optim.Adam([model.alphas]),
                     BilevelConfig(order=order, grad_clip=1.0, compile=compile))
    data = {k: (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
            for k in ("train", "valid")}
    return engine, data


def _loss(data: dict[str, tuple[torch.Tensor, torch.Tensor]], split: str):
    x, y = data[split]
    return lambda forward: ((forward(x) - y) ** 2).mean()


def test_exact_order_is_refused_with_compile() -> None:
    with pytest.raises(ConfigError, match="compile=default cannot run order=exact: compiled graphs have no double "
                                          "backward; use order=second or compile=off"):
        BilevelConfig(order="exact", compile="default")
    with pytest.raises(ConfigError, match="compile must be one of off, default"):
        BilevelConfig(compile="fast")


def test_a_compiled_model_gives_the_eager_hypergradient_and_weight_step(compiled_graphs: list) -> None:
    results = []
    for compile in ("off", "default"):
        engine, data = _engine(compile)
        torch.manual_seed(1)
        grads = engine.hypergradient(_loss(data, "train"), _loss(data, "valid")).grads
        engine.weight_step(_loss(data, "train"))
        results.append((grads, [p.detach().clone() for _, p in engine.weights]))
        assert bool(compiled_graphs) == (compile != "off")
    for eager, compiled in zip(*(torch.cat([t.flatten() for t in grads + weights]) for grads, weights in results)):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


def test_the_hessian_measurement_runs_eager_on_a_compiled_model(compiled_graphs: list,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    eager, data = _engine("off")
    expected = eager.alpha_hessian_eigen(_loss(data, "train"), iterations=3, tol=0.0).value
    compiled, data = _engine("default")
    assert compiled.alpha_hessian_eigen(_loss(data, "train"), iterations=3, tol=0.0).value == pytest.approx(expected)
    assert not compiled_graphs
    # what the eager stance avoids: the compiled graph's backward cannot be differentiated again
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance: nullcontext())
    with pytest.raises(RuntimeError, match="double backward"):
        compiled.alpha_hessian_eigen(_loss(data, "train"), iterations=3, tol=0.0)
    assert compiled_graphs


@pytest.mark.parametrize("module", ["rnn_darts.search", "cnn_darts.search"])
def test_both_searches_refuse_exact_with_compile_before_loading_data(module: str) -> None:
    search_config = importlib.import_module(module).SearchConfig
    assert search_config(order="second", compile="reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="cannot run order=exact"):
        search_config(order="exact", compile="reduce-overhead")


@pytest.mark.parametrize("mode, compiled_without_grad", [("default", True), ("reduce-overhead", False),
                                                         ("max-autotune", False)])
def test_calls_without_autograd_run_eager_where_cuda_graphs_would_free_their_outputs(
        compiled_graphs: list, mode: str, compiled_without_grad: bool) -> None:
    # a CUDA-graph replay with no backward pending frees the last replay's outputs, which evaluation still holds
    unit = compile_unit(lambda x: (x * 2).sin(), mode)
    x = torch.randn(4, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(unit(x), (x * 2).sin())
    assert bool(compiled_graphs) == compiled_without_grad
    unit(x).sum().backward()  # training: compiled in every mode
    assert compiled_graphs and torch.allclose(x.grad, 2 * (x * 2).cos())


def test_compile_refuses_synced_batch_norm() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), SyncedBatchNorm(4))
    with pytest.raises(ConfigError, match="compile does not run with sync_batch_norm=True"):
        compile_model(model, "default")


@pytest.mark.parametrize("capability, width", [("AVX512", 512), ("AVX2", 256), ("DEFAULT", None)])
def test_inductor_code_follows_the_aten_cpu_capability(monkeypatch: pytest.MonkeyPatch, compiled_graphs: list,
                                                       capability: str, width: int | None) -> None:
    # in inductor's config, so its graph cache keys on it: a graph cached under AVX-512 and loaded under
    # ATEN_CPU_CAPABILITY=avx2 made the first step NaN (torch 2.13)
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "simdlen", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    compile_model(torch.nn.Linear(2, 2), "default")
    assert config.cpp.simdlen == width
