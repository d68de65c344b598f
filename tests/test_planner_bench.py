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


# what the GPU machine lacks (../shared/GPU.md): the script must run without them
ABSENT_ON_THE_GPU_MACHINE = ("datasets", "deepspeed", "megatron", "transformer_engine", "deep_ep")


def test_gpu_check_cpu_smoke_writes_every_section(tmp_path):
    """The whole script as the GPU machine runs it (a fresh process, its missing packages made unimportable)."""
    import subprocess

    gpu_check = _bench("gpu_check")
    code = (f"import runpy, sys\nfor m in {ABSENT_ON_THE_GPU_MACHINE!r}: sys.modules[m] = None\n"
            f"sys.argv = ['gpu_check.py', '--cpu-smoke', '--out', {str(tmp_path)!r}]\n"
            f"runpy.run_path({str(BENCH / 'gpu_check.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    for name in gpu_check.SECTIONS:
        assert name in result and "error" not in result[name], (name, result.get(name))
    assert result["failed_checks"] == {}
    assert "not tested on one GPU" in proc.stdout and "NCCL" in proc.stdout and "DeepEP" in proc.stdout
    assert all(name in proc.stdout for name in gpu_check.SECTIONS)  # the summary table
    for E, K, null, all_null in gpu_check.SMOKE_SHAPES["permute_cases"]:
        case = result["permute"][f"E{E}_K{K}_null{null}_allnull{all_null}"]
        assert case["rel_err_values"] == 0 and (case["all_null_tokens"] > 0) == (all_null > 0), case
    assert max(E for E, *_ in gpu_check.SMOKE_SHAPES["permute_cases"]) >= 256
    routing = [v for v in result["routing"].values() if isinstance(v, dict)]
    assert len(routing) == len(gpu_check.SMOKE_SHAPES["routing_cases"])
    assert any(r["all_null_tokens"] > 0 for r in routing) and all(r["tokens_with_different_picks"] == 0 for r in routing)
    for name in gpu_check.SMOKE_SHAPES["gemm_shapes"]:
        bal, skew = result["grouped_gemm"][f"{name}_balanced"], result["grouped_gemm"][f"{name}_skewed"]
        assert bal["fwd_tflops"] > 0 and bal["bwd_tflops"] > 0 and skew["fwd_tflops"] > 0
        assert skew["max_rows_per_expert"] > bal["max_rows_per_expert"]
    fp8 = result["fp8"]["fp8_rowwise"]  # CPU emulation: speed means nothing, the formula does
    assert fp8["speedup_vs_bf16"] == pytest.approx(fp8["tflops"] / result["fp8"]["bf16_tflops"])
    assert fp8["rel_error"] < 0.1
    assert all(result["collectives"]["checks"].values()), result["collectives"]
    assert result["null_layer"]["0.5"]["assignments"] < result["null_layer"]["0.0"]["assignments"]
    assert result["memory"]["measured_fwd_bwd_extra_bytes"] > 0


def test_gpu_check_speedup_is_reference_over_candidate():
    """A kernel 1.6x faster than bf16 prints 1.6 (it printed 0.62)."""
    assert _bench("gpu_check").speedup(1.6e-3, 1.0e-3) == pytest.approx(1.6)


@pytest.mark.parametrize("section", ["routing", "permute"])
def test_gpu_check_fails_on_a_wrong_kernel(tmp_path, monkeypatch, capsys, section):
    """A kernel result that disagrees with the torch reference fails the run and the summary names it."""
    gpu_check = _bench("gpu_check")

    if section == "routing":
        def wrong(*args):
            out = gpu_check._route_pass(*args)
            out["idx"] = out["idx"].clone()
            out["idx"][-1, 0] = (out["idx"][-1, 0] + 1) % args[2]  # one pick moved to another expert
            return out

        monkeypatch.setattr(gpu_check, "route_under_test", wrong)
    else:
        def wrong(*args):
            out = gpu_check._permute_pass(*args)
            out["values"] = out["values"].clone()
            out["values"][-1] *= 1.5  # one token's combined row off
            return out

        monkeypatch.setattr(gpu_check, "permute_under_test", wrong)
    assert gpu_check.main(["--cpu-smoke", "--only", section, "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert section in result["failed_checks"] and "error" not in result[section]
    io = capsys.readouterr()
    assert "FAILED" in io.out and "FAILED checks" in io.err and section in io.err


def test_gpu_check_routing_near_ties_are_counted_not_failed():
    gpu_check = _bench("gpu_check")

    probs = torch.tensor([[0.4, 0.3, 0.3 - 1e-8, 0.0], [0.5, 0.3, 0.2, 0.0]])
    ref = {"probs": probs, "weights": torch.zeros(2, 2), "idx": torch.tensor([[0, 1], [0, 1]]),
           "counts": torch.tensor([2, 2, 0, 0]), "grad": torch.zeros(2, 4)}
    tied = {**ref, "idx": torch.tensor([[0, 2], [0, 1]]), "counts": torch.tensor([2, 1, 1, 0])}
    res, bad = gpu_check._compare_routing(tied, ref, None, 1e-5)
    assert res["near_ties"] == 1 and bad == []
    wrong = {**ref, "idx": torch.tensor([[0, 1], [0, 2]]), "counts": torch.tensor([2, 1, 1, 0])}
    res, bad = gpu_check._compare_routing(wrong, ref, None, 1e-5)
    assert res["near_ties"] == 0 and any("picks differ on 1" in b for b in bad) and "counts differ" in bad


def test_gpu_check_from_a_checkout_without_moe_train_says_how(tmp_path, monkeypatch, capsys):
    gpu_check = _bench("gpu_check")

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "moe_train", None)  # neither installed nor importable from the checkout
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps --no-build-isolation -e ." in capsys.readouterr().err
    assert gpu_check.ROOT in sys.path  # the checkout root was tried


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
