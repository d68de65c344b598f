"""Worker of tests/test_fake_cuda.py: one MoE layer per shipped family at its REAL dimensions, forward and backward on
fake CUDA tensors (FakeTensorMode: nothing is allocated), in bf16, through the CUDA branches (the Triton custom ops'
fakes, torch._grouped_mm's meta kernel = CUDA's checks, FP8 _scaled_grouped_mm). Prints one JSON line per case.

A CPU-only torch build cannot run autograd on CUDA tensors (no CUDA device guard / accelerator hooks): the test
runs this file with LD_PRELOAD of a tiny no-op CUDA shim it compiles (FAKE_CUDA_SHIM in the test). Row counts come
from a concrete CPU routing of the same 64-token batch (the router at its real size), passed to the permutation as
the expert-parallel dispatcher passes them (num_rows).
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.config import load_config
from moe_train.kernels import grouped_gemm as GG
from moe_train.kernels import triton_permute as TP
from moe_train.kernels.cuda_rules import CudaRuleError, check_grouped_mm
from moe_train.kernels.permute import build_permutation
from moe_train.model.moe_layer import LocalDispatcher, MoELayer
from moe_train.routing import build_router

T = 64


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class KnownRows(LocalDispatcher):
    """LocalDispatcher with the row count known on the host (as the expert-parallel dispatcher knows it)."""

    def __init__(self, num_rows: int):
        super().__init__("auto")
        self.num_rows = num_rows

    def permutation(self, plan, num_experts):
        return build_permutation(plan.expert_idx_TK, num_experts, backend=self.permute_backend, num_rows=self.num_rows)


def cpu_rows(mcfg) -> int:
    torch.manual_seed(0)
    router = build_router(mcfg.hidden_size, mcfg.moe)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        plan = router(torch.randn(T, mcfg.hidden_size))
    return int((plan.expert_idx_TK >= 0).sum())


def rehearse(path: str, gemm_backend: str = "auto") -> dict:
    mcfg = load_config(path).model
    mcfg.moe.gemm_backend = gemm_backend
    n = cpu_rows(mcfg)
    from torch._subclasses.fake_tensor import FakeTensorMode

    dflt = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters born bf16 (Module.to cannot swap fake parameters)
    try:
        with FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
            return _rehearse(path, gemm_backend, mcfg, n)
    finally:
        torch.set_default_dtype(dflt)


def _rehearse(path, gemm_backend, mcfg, n):
    if True:  # noqa: SIM108 - keeps the block of the with statement it came from
        layer = MoELayer(mcfg)
        assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in layer.parameters())
        layer.dispatcher = KnownRows(n)
        x = torch.randn(1, T, mcfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        ops = Ops()
        with ops:
            y, plan = layer(x)
            y.float().square().sum().backward()
        grads = {name: (str(p.grad.device), str(p.grad.dtype), tuple(p.grad.shape)) for name, p in
                 layer.named_parameters() if p.grad is not None}
        assert x.grad is not None and x.grad.is_cuda and x.grad.dtype == torch.bfloat16
        assert str(y.device) == "cuda:0" and y.dtype == torch.bfloat16, (y.device, y.dtype)
    return dict(config=path, gemm=gemm_backend, D=mcfg.hidden_size, F=mcfg.intermediate_size,
                E=mcfg.moe.num_experts, rows=n, ops=sorted(o for o in ops.seen if "moe_train" in o or "grouped" in o),
                grads=grads)


def injections() -> dict:
    """A device mix and fp32 operands injected into the CUDA path: each must raise a clear error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = {}
    with FakeTensorMode(allow_non_fake_inputs=False):
        x = torch.randn(16, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(4, 64, 128, dtype=torch.bfloat16, device="cuda")
        counts = torch.full((4,), 4, dtype=torch.int64, device="cuda")
        rows_cpu = torch.zeros(16, 1, dtype=torch.int64, device="cpu")
        cases = {
            "cpu_rows_into_permute": lambda: TP.permute(x, rows_cpu, 16),
            "cpu_weights_into_grouped_mm": lambda: GG.grouped_mm(x, w.to("cpu"), counts),
            "fp32_into_bf16_grouped_mm": lambda: GG.grouped_mm_torch(x.float(), w.float(), counts),
            "fp32_validator": lambda: check_grouped_mm(x.float(), w.float(), counts.int()),
            "int64_offsets_validator": lambda: check_grouped_mm(x, w, counts),
        }
        for name, run in cases.items():
            try:
                run()
                out[name] = None
            except Exception as e:  # noqa: BLE001 - the message is the result
                out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        out["validator_class"] = issubclass(CudaRuleError, ValueError)
    return out


def main(argv: list[str]) -> int:
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # an H100 (no GPU here: nothing to ask)
    for arg in argv:
        try:
            if arg == "inject":
                res = injections()
            else:
                path, _, gemm = arg.partition(":")
                res = rehearse(path, gemm or "auto")
            print(json.dumps(dict(case=arg, ok=True, result=res)), flush=True)
        except Exception:  # noqa: BLE001
            print(json.dumps(dict(case=arg, ok=False, error=traceback.format_exc()[-3000:])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
