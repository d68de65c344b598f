"""The planner's benchmarks cannot rot: bench/gpu_check.py --cpu-smoke (every section at tiny shapes, torch parts
only) and bench/scaling.py's staged layer step at ep 1 (its stages add up to a forward + backward whose gradients
equal the uncut layer's). No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(name: str):
    """A bench script as a module, loaded by path under a private name, so bench/ never joins the test process's
    sys.path."""
    import importlib.util

    if f"_bench_{name}" in sys.modules:
        return sys.modules[f"_bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    gpu_check = _bench("gpu_check")

    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in gpu_check.SECTIONS:
        assert name in result and "error" not in result[name], (name, result.get(name))
    assert result["null_layer"]["0.5"]["assignments"] < result["null_layer"]["0.0"]["assignments"]
    assert result["memory"]["measured_fwd_bwd_extra_bytes"] > 0


def test_gpu_check_without_cuda_says_so(tmp_path, capsys):
    gpu_check = _bench("gpu_check")

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_scaling_staged_step_equals_the_layer():
    """The stage cuts are exact: the staged forward + backward gives the uncut dispatcher's gradients."""
    scaling = _bench("scaling")

    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=16, intermediate_size=24, moe=MoEConfig(num_experts=4, top_k=2)))
    with torch.no_grad():
        for p in layer.parameters():  # the stacked experts are created uninitialised (torch.empty)
            p.normal_(std=0.1)
    x = torch.randn(32, 16)
    keep = scaling._keep(32, 2, 0.25, seed=0)
    xi = x.clone().requires_grad_(True)
    plan = scaling._null_plan(layer.router(xi), keep, 4)
    y = layer.dispatcher(xi, plan, layer.experts)
    y.backward(torch.ones_like(y))
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    seen = {}
    for n, p in layer.named_parameters():
        p.register_hook(lambda g, n=n: seen.__setitem__(n, g.clone()))
    stages = scaling.staged_step(layer, x, keep, None, 1, 0)
    assert set(stages) >= {f"{d}_{s}" for d in ("fwd", "bwd") for s in scaling.STAGES if s != "count_exchange"}
    for n, g in want.items():
        torch.testing.assert_close(seen[n], g, rtol=1e-5, atol=1e-6)
