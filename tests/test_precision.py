"""bf16 mixed precision: which dtypes actually reach the expert GEMM kernels, and FSDP2's MixedPrecisionPolicy.

1. Every grouped GEMM backend (and the LoRA low-rank products) under bf16, three ways: fp32 module under
   torch.autocast (the single-process trainer), bf16 parameters (what FSDP2 with param_dtype=bf16 hands the
   module), and bf16 activations meeting fp32 weights. A TorchDispatchMode records the operand dtypes of every
   matmul-family aten op that runs, forward AND backward (it sits below autograd and autocast, so it sees what the
   kernel gets). None may be fp32: bf16, or FP8 for the FP8 GEMMs of the fp8 backends.
   Transformer Engine runs on CUDA only, so te / te_fp8 run against a stub transformer_engine module whose
   GroupedLinear records the dtypes it is handed and computes the product with plain matmuls; the CUDA check is
   patched out. That exercises our TE path (casting, padding, weight binding) on CPU; what TE does inside (its own
   FP8 cast under te_fp8) is not observable without TE and a GPU.
2. Two gloo ranks, ep=2, the trainer with train.precision bf16: FSDP2 keeps fp32 master parameters, all-gathers
   bf16, reduce-scatters fp32 gradients, computes the expert GEMMs in bf16 without autocast, and follows the fp32
   run's losses within a measured bf16 spread.
Shape legend: N rows grouped by expert, D hidden, F expert FFN width, E experts.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.config import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig, to_dict
from moe_train.kernels import grouped_gemm as gg
from moe_train.model.experts import GroupedExperts
from moe_train.model.lora import LoRAGroupedExperts

import ep_workers as W

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ("auto", "grouped_mm", "loop", "te", "te_fp8", "fp8_rowwise", "fp8_tensorwise")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
E, D, F = 2, 16, 32  # multiples of 16: every backend (FP8 tiles included) accepts them
COUNTS = [5, 3]

_aten = torch.ops.aten
MATMUL_OPS = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default, _aten.mv.default,
              _aten.dot.default, _aten._grouped_mm.default, _aten._scaled_mm.default}
for _name in ("_scaled_grouped_mm",):
    if hasattr(_aten, _name):
        MATMUL_OPS.add(getattr(_aten, _name).default)


class MatmulDtypes(TorchDispatchMode):
    """Records (op, floating operand dtypes) of every matmul-family aten op."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMUL_OPS:
            # the scaled FP8 GEMMs take their (fp32) scales as tensor arguments too: only the two matrices count
            mats = args[:2] if func.__name__.startswith("_scaled") else args
            dts = tuple(a.dtype for a in mats if isinstance(a, torch.Tensor) and a.is_floating_point())
            self.calls.append((func.__name__, dts))
        return func(*args, **(kwargs or {}))


class _StubGroupedLinear(torch.nn.Module):
    """transformer_engine.pytorch.GroupedLinear's interface on CPU: weight{e} [O, I]; records what it is handed."""

    seen: list = []

    def __init__(self, num_gemms, in_features, out_features, bias=False, params_dtype=None, device=None):
        super().__init__()
        self.num_gemms = num_gemms
        for e in range(num_gemms):
            self.register_parameter(f"weight{e}", torch.nn.Parameter(
                torch.empty(out_features, in_features, dtype=params_dtype, device=device)))

    def forward(self, inp, m_splits):
        ws = [getattr(self, f"weight{e}") for e in range(self.num_gemms)]
        _StubGroupedLinear.seen.append((inp.dtype, tuple(w.dtype for w in ws)))
        return torch.cat([xe @ w.t() for xe, w in zip(torch.split(inp, m_splits), ws)])


@pytest.fixture
def stub_te(monkeypatch):
    te = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_pt.GroupedLinear = _StubGroupedLinear
    te_pt.autocast = lambda enabled=True, recipe=None: contextlib.nullcontext()
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling = lambda **kw: kw
    recipe.Format = types.SimpleNamespace(HYBRID="HYBRID")
    te.pytorch, te.common, common.recipe = te_pt, common, recipe
    for name, mod in {"transformer_engine": te, "transformer_engine.pytorch": te_pt,
                      "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(gg, "_require_cuda", lambda x, backend: None)  # TE is CUDA-only; the stub is not
    monkeypatch.setattr(gg, "_TE_RECIPE", None)
    _StubGroupedLinear.seen = []
    yield _StubGroupedLinear.seen


def _experts(backend: str, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = GroupedExperts(E, D, F, backend)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.2)
    if lora:
        m = LoRAGroupedExperts(m, rank=3, alpha=6.0)  # rank 3: unaligned, the low-rank products take the loop
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_" in f".{n}" and n.endswith("_B"):
                    p.normal_(std=0.2)  # non-zero B: the low-rank products matter
    return m


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("mode", ["autocast", "bf16_params", "bf16_x_fp32_w"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_expert_gemm_runs_in_fp32_under_bf16(stub_te, backend, mode, lora):
    m = _experts(backend, lora)
    if mode == "bf16_params":
        m = m.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x_ND = torch.randn(sum(COUNTS), D, generator=g)
    if mode != "autocast":
        x_ND = x_ND.bfloat16()
    x_ND.requires_grad_(True)
    counts_E = torch.tensor(COUNTS)
    rec = MatmulDtypes()
    with rec:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            y_ND = m(x_ND, counts_E)
        y_ND.float().square().sum().backward()  # backward outside autocast, as the trainer does
    assert y_ND.dtype == torch.bfloat16, y_ND.dtype
    assert rec.calls, "no matmul reached a kernel"
    bad = [c for c in rec.calls if any(dt not in (torch.bfloat16, *FP8) for dt in c[1])]
    assert not bad, f"{backend}/{mode}: GEMMs outside bf16/FP8: {bad}"
    if backend.startswith("fp8_"):  # the forward and dgrad GEMMs are FP8 (wgrad stays bf16, by the recipe)
        scaled = [c for c in rec.calls if c[0].startswith("_scaled")]
        assert scaled and all(dt in FP8 for c in scaled for dt in c[1]), rec.calls
    if backend.startswith("te"):
        assert stub_te and all(x == torch.bfloat16 and set(ws) == {torch.bfloat16} for x, ws in stub_te), stub_te
    grads = [p.grad for p in m.parameters()] + [x_ND.grad]
    assert all(gr is not None and torch.isfinite(gr.float()).all() for gr in grads)
    # gradients land in each leaf's own dtype: fp32 masters stay fp32 under autocast
    assert all(p.grad.dtype == p.dtype for p in m.parameters())


def test_mixed_fp16_bf16_operands_are_a_user_error():
    x_ND = torch.randn(sum(COUNTS), D, dtype=torch.float16)
    w_EDF = torch.randn(E, D, F, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float16"):
        gg.grouped_mm(x_ND, w_EDF, torch.tensor(COUNTS), "loop")


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 mixed precision through the trainer on 2 gloo ranks
# ---------------------------------------------------------------------------------------------------------------

# Measured (this CPU, torch 2.13, 2 gloo ranks, ep=2, the config below): the largest |loss_bf16 - loss_fp32| over
# the 3 steps was 1.32e-3 (seed 0), 1.40e-3 (seed 1), 4.8e-4 (seed 2), on losses of ~3.4-3.5, i.e. ~4e-4 relative,
# a tenth of bf16's 2^-8 = 3.9e-3 rounding step. The bound leaves ~3.5x headroom over the largest. It does not pin
# bf16 by itself (an all-fp32 run passes it): the dtype assertions and the spread > 0 check do.
SPREAD_MEASURED = 1.40e-3
LOSS_TOL = 3.5 * SPREAD_MEASURED  # 4.9e-3


def _precision_config(tmp_path, precision: str, seed: int = 0) -> Config:
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, aux_loss_coef=0.01,
                    z_loss_coef=1e-3)
    return Config(model=ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                                    num_kv_heads=1, max_seq_len=16, moe=moe),
                  train=TrainConfig(steps=3, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, log_every=100,
                                    grad_clip=0.5, precision=precision, tensorboard=False, seed=seed,
                                    out_dir=str(tmp_path / precision)),
                  data=DataConfig(num_sequences=16, val_sequences=0),
                  parallel=ParallelConfig(ep=2, global_aux_loss=True, rendezvous_timeout_s=30))


def test_fsdp_bf16_policy_on_two_ranks(tmp_path):
    cfgs = [to_dict(_precision_config(tmp_path, p)) for p in ("fp32", "bf16")]
    res = W.spawn("precision_runs", 2, tmp_path, cfg_dicts=cfgs)
    for rank, r in enumerate(res):
        fp32, bf16 = r["fp32"], r["bf16"]
        for name, run in (("fp32", fp32), ("bf16", bf16)):
            assert run["fsdp"], name
            assert run["param_dtypes"] == ["torch.float32"], (name, run["param_dtypes"])  # fp32 masters
            assert run["grad_dtypes"] == ["torch.float32"], (name, run["grad_dtypes"])
            assert run["optim_state_dtypes"] == ["torch.float32"], (name, run["optim_state_dtypes"])
            assert not run["autocast_in_gemm"], name  # FSDP's param policy, not autocast over fp32 all-gathers
        assert fp32["gemm_dtypes"] == ["torch.float32"], fp32["gemm_dtypes"]
        assert bf16["gemm_dtypes"] == ["torch.bfloat16"], (rank, bf16["gemm_dtypes"])  # expert GEMM operands
        assert bf16["all_gather_dtypes"] == ["torch.bfloat16"], (rank, bf16["all_gather_dtypes"])
        assert bf16["reduce_scatter_dtypes"] == ["torch.float32"], (rank, bf16["reduce_scatter_dtypes"])
        assert bf16["all_to_all_row_dtypes"] == ["torch.bfloat16"], (rank, bf16["all_to_all_row_dtypes"])
        assert fp32["all_gather_dtypes"] == ["torch.float32"]
    rows = {p: [r["loss"] for r in map(json.loads, (tmp_path / p / "metrics.jsonl").read_text().splitlines())
                if "lm_loss" in r] for p in ("fp32", "bf16")}
    assert len(rows["fp32"]) == len(rows["bf16"]) == 3
    spread = max(abs(a - b) for a, b in zip(rows["fp32"], rows["bf16"]))
    assert spread > 0, "the bf16 run computed exactly the fp32 losses: it did not run in bf16"
    assert spread <= LOSS_TOL, (rows, spread)
