"""The CUDA paths checked without a GPU: torch's CUDA rules for the grouped GEMMs (moe_train/kernels/cuda_rules.py
against torch's own meta kernel, at every shipped family's expert shapes in bf16), and one MoE layer per shipped config
at its real size, forward + backward on fake CUDA tensors (tests/fake_cuda_workers.py, one subprocess).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.kernels.cuda_rules import CudaRuleError, check_grouped_mm
from moe_train.model.experts import GroupedExperts

ROOT = Path(__file__).resolve().parent.parent
# (family, D, F, E): the expert shapes of the shipped families
FAMILIES = (("mixtral-8x7b", 4096, 14336, 8), ("mixtral-8x22b", 6144, 16384, 8), ("deepseek-v3", 7168, 2048, 256),
            ("qwen3-30b-a3b", 2048, 768, 128), ("longcat-flash", 6144, 2048, 512))
CONFIGS = ("mixtral_8x7b_adamoe", "mixtral_8x22b_adamoe", "qwen3_moe_adamoe", "adak_deepseek_v2_lite",
           "adak_qwen1.5_moe", "adak_mixtral_8x7b")

# A CPU-only torch build has no CUDA device guard nor accelerator hooks, so autograd aborts on (fake) CUDA tensors;
# this no-op CUDA device (LD_PRELOADed into the worker only) lets the engine run. CUDA builds need none.
FAKE_CUDA_SHIM = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/detail/CUDAHooksInterface.h>
namespace fk {
struct Guard final : c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA> {
  static c10::Stream dflt() { return c10::Stream(c10::Stream::DEFAULT, c10::Device(c10::DeviceType::CUDA, 0)); }
  c10::Device exchangeDevice(c10::Device) const override { return c10::Device(c10::DeviceType::CUDA, 0); }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::CUDA, 0); }
  c10::Stream getStream(c10::Device) const noexcept override { return dflt(); }
  c10::Stream getDefaultStream(c10::Device) const override { return dflt(); }
  c10::Stream exchangeStream(c10::Stream) const noexcept override { return dflt(); }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
};
struct Hooks : at::CUDAHooksInterface {
  Hooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};
struct Reg {
  Reg() {
    static Guard impl;
    auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
    if (slot.load() == nullptr) slot.store(&impl);
  }
} reg;
}
namespace at { C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", fk::Hooks) }
"""


# ----------------------------------------------------------------------------------------------------------------
# the validator against torch's meta kernel (CUDA's checks) at the call sites of the expert code
# ----------------------------------------------------------------------------------------------------------------


class _GroupedCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (torch.ops.aten._grouped_mm, torch.ops.aten._scaled_grouped_mm):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family,D,F,E", FAMILIES)
def test_expert_grouped_mm_operands_meet_cuda_rules(family, D, F, E):
    """GroupedExperts forward + backward in bf16 on meta tensors (no memory) at the family's shapes: every
    torch._grouped_mm the expert code and its backward issue passes torch's meta kernel and our validator."""
    dflt = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            experts = GroupedExperts(E, D, F, backend="grouped_mm")
            x = torch.empty(64 * 4, D, requires_grad=True)
            counts = torch.empty(E, dtype=torch.int64)
    finally:
        torch.set_default_dtype(dflt)
    rec = _GroupedCalls()
    with rec:
        y = experts(x, counts)
        y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.shape == x.shape and experts.w_down.grad.shape == (E, F, D)
    assert len(rec.calls) >= 3 + 6, family  # 3 forward GEMMs, dgrad + wgrad of each
    for func, args, kwargs in rec.calls:
        a, b = args[0], args[1]
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        check_grouped_mm(a, b, offs, where=f"{family} {func}")


def _meta(shape, dtype=torch.bfloat16, stride=None):
    return torch.empty_strided(shape, stride or torch.empty(shape, device="meta").stride(), dtype=dtype, device="meta")


CASES = {  # name: (a, b, offs) -> the validator and torch's meta kernel must agree
    "ok_2d_3d": lambda: (_meta((32, 64)), _meta((4, 64, 128)), _meta((4,), torch.int32)),
    "ok_2d_2d_wgrad": lambda: (_meta((64, 32)).t(), _meta((32, 128)), _meta((4,), torch.int32)),
    "ok_transposed_b": lambda: (_meta((32, 64)), _meta((4, 128, 64)).transpose(1, 2), _meta((4,), torch.int32)),
    "fp32": lambda: (_meta((32, 64), torch.float32), _meta((4, 64, 128), torch.float32), _meta((4,), torch.int32)),
    "int64_offs": lambda: (_meta((32, 64)), _meta((4, 64, 128)), _meta((4,), torch.int64)),
    "unaligned_in": lambda: (_meta((32, 60)), _meta((4, 60, 128)), _meta((4,), torch.int32)),
    "unaligned_out": lambda: (_meta((32, 64)), _meta((4, 64, 100)), _meta((4,), torch.int32)),
    "strided_a": lambda: (_meta((32, 128))[:, ::2], _meta((4, 64, 128)), _meta((4,), torch.int32)),
    "no_offs": lambda: (_meta((32, 64)), _meta((4, 64, 128)), None),
    "contraction": lambda: (_meta((32, 64)), _meta((4, 72, 128)), _meta((4,), torch.int32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_validator_agrees_with_torch_meta_kernel(name):
    a, b, offs = CASES[name]()
    try:
        torch._grouped_mm(a, b, offs=offs)
        meta_ok = True
    except RuntimeError:
        meta_ok = False
    try:
        check_grouped_mm(a, b, offs)
        ours_ok = True
    except CudaRuleError:
        ours_ok = False
    assert ours_ok == meta_ok == name.startswith("ok"), (name, ours_ok, meta_ok)


# ----------------------------------------------------------------------------------------------------------------
# one layer per shipped config at its real size on fake CUDA tensors
# ----------------------------------------------------------------------------------------------------------------


def _shim(tmp_path) -> dict:
    """Environment for the worker: LD_PRELOAD of the no-op CUDA shim on CPU-only builds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if torch.version.cuda:
        return env
    cxx = shutil.which("g++") or shutil.which("c++")
    tdir = Path(torch.__file__).parent
    if cxx is None or not (tdir / "include" / "ATen" / "detail" / "CUDAHooksInterface.h").exists():
        pytest.skip("CPU-only torch without a C++ compiler or torch headers: no fake CUDA autograd")
    src, lib = tmp_path / "fake_cuda.cpp", tmp_path / "fake_cuda.so"
    src.write_text(FAKE_CUDA_SHIM)
    subprocess.run([cxx, "-shared", "-fPIC", "-std=c++20", "-w", f"-I{tdir / 'include'}", str(src), f"-L{tdir / 'lib'}",
                    "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}", "-o", str(lib)], check=True, timeout=300)
    env["LD_PRELOAD"] = str(lib)
    return env


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the custom ops live in the Triton modules)")
    env = _shim(tmp_path_factory.mktemp("fake_cuda"))
    cases = [f"configs/{c}.yaml" for c in CONFIGS] + ["configs/mixtral_8x7b_adamoe.yaml:fp8_rowwise", "inject"]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_cuda_workers.py"), *cases], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["case"]] = r
    return out


@pytest.mark.parametrize("case", [f"configs/{c}.yaml" for c in CONFIGS] + ["configs/mixtral_8x7b_adamoe.yaml:fp8_rowwise"])
def test_layer_forward_backward_on_fake_cuda_at_real_size(rehearsal, case):
    r = rehearsal[case]
    assert r["ok"], r.get("error")
    res = r["result"]
    ops = set(res["ops"])
    assert {"moe_train.build_rows", "moe_train.permute_rows", "moe_train.combine_rows",
            "moe_train.combine_rows_backward", "aten._grouped_mm"} <= ops, ops
    if case.endswith("fp8_rowwise"):
        assert "aten._scaled_grouped_mm" in ops
    for name in ("experts.w_gate", "experts.w_up", "experts.w_down"):
        assert res["grads"][name][:2] == ["cuda:0", "torch.bfloat16"], (name, res["grads"][name])


def test_injected_device_mix_and_fp32_are_caught(rehearsal):
    r = rehearsal["inject"]
    assert r["ok"], r.get("error")
    res = r["result"]
    assert "row_TK is on cpu" in res["cpu_rows_into_permute"]
    assert "different devices" in res["cpu_weights_into_grouped_mm"]
    assert "BF16" in res["fp32_into_bf16_grouped_mm"]
    assert "bfloat16" in res["fp32_validator"] and "int32" in res["int64_offsets_validator"]
