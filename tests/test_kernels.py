"""Kernels against independent references: Triton permutation (in the CPU interpreter) vs the plain-torch path and
a pure-python stable sort; grouped GEMM backends vs a float64 per-row product; FP8 vs exact dequantised math.

The Triton module is imported fresh under TRITON_INTERPRET=1 by a module-scoped fixture (triton decides interpreter
vs compiler when ``@triton.jit`` runs, i.e. at import); the variable and the module copy are removed afterwards so
that nothing leaks into other test modules. Shapes are small: the interpreter runs every program in numpy.
Shape legend: T tokens, K slots per token, D hidden, E experts, N true rows, I/O GEMM in/out features.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from moe_train.config import MoEConfig, validate_moe
from moe_train.kernels import fp8
from moe_train.kernels.grouped_gemm import grouped_mm

# the package re-exports the function `permute`, which shadows the submodule attribute of the same name
P = importlib.import_module("moe_train.kernels.permute")
TRITON_MODULE = "moe_train.kernels.triton_permute"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def tk():
    """moe_train.kernels.triton_permute defined under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop(TRITON_MODULE, None)
    mod = importlib.import_module(TRITON_MODULE)
    assert mod.INTERPRETED
    yield mod
    sys.modules.pop(TRITON_MODULE, None)  # the next importer gets a compiled (non-interpreted) copy
    mp.undo()


def make_plan(T: int, K: int, E: int, null_frac: float, seed: int = 0, all_null_tokens: int = 0,
              empty_experts: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)
    for e in empty_experts:
        idx[idx == e] = (e + 1) % E if (e + 1) % E not in empty_experts else -1
    idx[torch.rand(T, K, generator=g) < null_frac] = -1
    idx[:all_null_tokens] = -1
    w = torch.rand(T, K, generator=g, dtype=torch.float64) * (idx >= 0)
    return idx, w


def python_stable_sort(idx_TK: torch.Tensor, E: int) -> tuple[list[int], list[int]]:
    """Independent reference: true slots grouped by expert, ascending flat slot id within an expert."""
    flat = idx_TK.reshape(-1).tolist()
    slots = [s for e in range(E) for s, v in enumerate(flat) if v == e]
    return slots, [sum(v == e for v in flat) for e in range(E)]


PLANS = [  # (T, K, E, null_frac, all_null_tokens, empty_experts)
    (37, 3, 5, 0.3, 4, (2,)),
    (50, 8, 40, 0.5, 3, (0, 7, 39)),  # k_max 8, E > the 32-expert chunk of the build kernel
    (9, 2, 3, 1.0, 0, ()),  # every slot null: N = 0
    (16, 1, 4, 0.0, 0, ()),
    (0, 4, 4, 0.0, 0, ()),  # T = 0
]


# ---------------------------------------------------------------------------------------------------------------
# build_permutation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,K,E,null_frac,all_null,empty", PLANS)
def test_torch_build_matches_python_stable_sort(T, K, E, null_frac, all_null, empty):
    idx, _ = make_plan(T, K, E, null_frac, all_null_tokens=all_null, empty_experts=empty)
    perm = P.build_permutation(idx, E, backend="torch")
    slots, counts = python_stable_sort(idx, E)
    assert perm.slot_N.tolist() == slots and perm.counts_E.tolist() == counts
    assert perm.token_N.tolist() == [s // K for s in slots]
    row = perm.row_TK.reshape(-1).tolist()
    assert [row[s] for s in slots] == list(range(len(slots)))
    assert all(row[s] == -1 for s, v in enumerate(idx.reshape(-1).tolist()) if v < 0)


@needs_triton
@pytest.mark.parametrize("T,K,E,null_frac,all_null,empty", PLANS)
def test_triton_build_matches_reference(tk, T, K, E, null_frac, all_null, empty):
    idx, _ = make_plan(T, K, E, null_frac, seed=1, all_null_tokens=all_null, empty_experts=empty)
    ref = P.build_permutation(idx, E, backend="torch")
    # small blocks and expert chunks: several blocks and several chunks per block even at test sizes
    slot_N, token_N, counts_E, row_TK = tk.build_rows(idx, E, block=16, expert_chunk=8)
    assert torch.equal(slot_N, ref.slot_N) and torch.equal(token_N, ref.token_N)
    assert torch.equal(counts_E, ref.counts_E) and torch.equal(row_TK, ref.row_TK)
    if T:
        assert counts_E[list(empty)].sum() == 0


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_build_rejects_out_of_range_ids(tk, backend):
    for bad in (5, -2):
        idx = torch.tensor([[0, -1], [bad, 1]])
        with pytest.raises(ValueError, match="outside"):
            P.build_permutation(idx, 5, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# permute / unpermute_combine: values and gradients vs the torch reference's autograd (float64)
# ---------------------------------------------------------------------------------------------------------------


def run_layer(idx, w, E, D, backend, seed=0):
    """permute -> per-row nonlinearity -> weighted combine; returns output and grads of x and w."""
    T = idx.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = w.clone().requires_grad_(True)
    gout = torch.randn(T, D, generator=g, dtype=torch.float64)
    perm = P.build_permutation(idx, E, backend=backend)
    x_ND = P.permute(x, perm, backend=backend)
    y_ND = torch.tanh(x_ND) * (1 + perm.token_N[:, None] % 3)  # row-dependent so that row order matters
    out = P.unpermute_combine(y_ND, perm, w, T, backend=backend)
    gx, gw = torch.autograd.grad(out, (x, w), gout, allow_unused=True)
    return x_ND.detach(), out.detach(), gx, gw


@needs_triton
@pytest.mark.parametrize("T,K,E,null_frac,all_null,empty", PLANS)
@pytest.mark.parametrize("D", [13, 24])
def test_triton_permute_combine_values_and_grads(tk, monkeypatch, T, K, E, null_frac, all_null, empty, D):
    monkeypatch.setattr(tk, "MAX_BLOCK_D", 8)  # several D iterations, a ragged last one for D=13
    idx, w = make_plan(T, K, E, null_frac, seed=2, all_null_tokens=all_null, empty_experts=empty)
    ref = run_layer(idx, w, E, D, "torch")
    got = run_layer(idx, w, E, D, "triton")
    for r, g in zip(ref, got):
        assert g is not None and r is not None
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    if all_null:
        assert got[1][:all_null].abs().max() == 0 and got[2][:all_null].abs().max() == 0  # null tokens: 0 out, 0 grad
    assert (got[3][idx < 0] == 0).all()  # no gradient reaches a null slot's weight


@needs_triton
def test_triton_functions_gradcheck(tk):
    """Analytic backward of the two autograd Functions against finite differences (independent of the forward)."""
    idx, w = make_plan(4, 3, 4, 0.3, seed=3, all_null_tokens=1)
    perm = P.build_permutation(idx, 4, backend="torch")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(perm.num_rows, 3, dtype=torch.float64, requires_grad=True)
    w = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: tk.permute(a, perm.row_TK, perm.num_rows), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: tk.unpermute_combine(a, b, perm.row_TK), (y, w), fast_mode=True)


@needs_triton
def test_triton_low_precision_rows_accumulate_in_fp32(tk):
    idx, w = make_plan(20, 4, 6, 0.4, seed=4)
    perm = P.build_permutation(idx, 6, backend="torch")
    y = torch.randn(perm.num_rows, 40, dtype=torch.bfloat16)
    out = tk.unpermute_combine(y, w.float(), perm.row_TK)
    exact = P.unpermute_combine(y.double(), perm, w, 20, backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the result


@needs_triton
def test_triton_backend_through_local_dispatcher(tk):
    from moe_train.model.experts import GroupedExperts
    from moe_train.model.moe_layer import LocalDispatcher
    from moe_train.routing.plan import RoutingPlan

    torch.manual_seed(0)
    E, D, F, T = 4, 12, 8, 10
    experts = GroupedExperts(E, D, F, "loop")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    idx, w = make_plan(T, 3, E, 0.4, seed=5, all_null_tokens=2, empty_experts=(1,))
    x = torch.randn(T, D)
    outs = []
    for backend in ("torch", "triton"):
        experts.zero_grad()
        plan = RoutingPlan(idx, w.float().requires_grad_(True), P.build_permutation(idx, E).counts_E,
                           torch.zeros(()), torch.zeros(()))
        xx = x.clone().requires_grad_(True)
        y = LocalDispatcher(backend)(xx, plan, experts)
        y.square().sum().backward()
        outs.append([y, xx.grad, plan.weight_TK.grad] + [p.grad.clone() for p in experts.parameters()])
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_permute_backend_errors(monkeypatch):
    idx = torch.tensor([[0, -1]])
    with pytest.raises(ValueError, match="not one of"):
        P.build_permutation(idx, 2, backend="cuda")
    # auto on CPU never touches triton (it would need the interpreter)
    monkeypatch.setattr(P, "_triton_kernels", lambda: (_ for _ in ()).throw(AssertionError("triton used")))
    P.permute(torch.randn(1, 3), P.build_permutation(idx, 2), backend="auto")


@needs_triton
def test_permute_triton_missing_or_not_interpreted(tk, monkeypatch):
    idx = torch.tensor([[0, -1]])
    monkeypatch.setattr(tk, "INTERPRETED", False)  # a compiled module cannot take CPU tensors
    with pytest.raises(ValueError, match="CUDA tensors"):
        P.build_permutation(idx, 2, backend="triton")
    monkeypatch.delitem(sys.modules, TRITON_MODULE)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ImportError, match="needs the triton package"):
        P.build_permutation(idx, 2, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# grouped GEMM
# ---------------------------------------------------------------------------------------------------------------


def gemm_case(counts, I, O, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts)
    N = int(counts_E.sum())
    x = torch.randn(N, I, generator=g, dtype=dtype)
    w = torch.randn(len(counts), I, O, generator=g, dtype=dtype) / I ** 0.5
    gy = torch.randn(N, O, generator=g, dtype=dtype)
    return x, w, counts_E, gy


def reference_fp64(x, w, counts_E, gy):
    """Per-row product with each row's own expert weight, float64: independent of every backend."""
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    y = torch.einsum("ni,nio->no", x64, w64[expert_N])
    gx, gw = torch.autograd.grad(y, (x64, w64), gy.double())
    return y.detach(), gx, gw


def run_gemm(x, w, counts_E, gy, backend):
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = grouped_mm(xx, ww, counts_E, backend)
    gx, gw = torch.autograd.grad(y, (xx, ww), gy)
    return y.detach(), gx, gw


GEMM_CASES = [([5, 0, 17, 9], 32, 48), ([0, 0, 0], 16, 32), ([3, 11], 16, 16), ([0, 7, 0, 1], 48, 16)]


@pytest.mark.parametrize("counts,I,O", GEMM_CASES)
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
def test_grouped_mm_matches_fp64(backend, counts, I, O):
    x, w, counts_E, gy = gemm_case(counts, I, O)
    got = run_gemm(x, w, counts_E, gy, backend)
    for g, r in zip(got, reference_fp64(x, w, counts_E, gy)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_grouped_mm_unaligned_and_unknown_backend():
    x, w, counts_E, gy = gemm_case([2, 3], 6, 10)
    with pytest.raises(ValueError, match="multiples of 4"):
        grouped_mm(x, w, counts_E, "grouped_mm")
    # fp32 GEMM (kernel varies by CPU: AVX2 / AVX-512) vs float64: fp32 tolerances, as in test_grouped_mm_matches_fp64
    torch.testing.assert_close(grouped_mm(x, w, counts_E, "auto").double(), reference_fp64(x, w, counts_E, gy)[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        grouped_mm(x, w, counts_E, "cutlass")
    with pytest.raises(ValueError, match="multiples of 16"):
        grouped_mm(x, w, counts_E, "fp8_rowwise")


def test_grouped_mm_fallback_is_logged_once(monkeypatch, caplog):
    """On CUDA, torch._grouped_mm runs a per-expert loop (with a host sync) for anything but bf16 on Hopper /
    Blackwell: correct but slow, so it is logged, once per reason."""
    from types import SimpleNamespace

    from moe_train.kernels import grouped_gemm as G

    fake_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=None)
    assert "float32 operands" in G.fallback_reason(fake_cuda) and "bf16 only" in G.fallback_reason(fake_cuda)
    assert G.fallback_reason(torch.zeros(1)) is None  # CPU: one path, nothing to say
    monkeypatch.setattr(G, "_WARNED", set())
    monkeypatch.setattr(G, "fallback_reason", lambda x: "float32 operands: test")  # as a CUDA fp32 call would get
    x, w, counts_E, _ = gemm_case([2, 3], 8, 8)
    with caplog.at_level("WARNING", logger=G.__name__):
        for _ in range(3):
            grouped_mm(x, w, counts_E, "grouped_mm")
    hits = [r for r in caplog.records if "per-expert loop" in r.getMessage()]
    assert len(hits) == 1 and "float32 operands: test" in hits[0].getMessage()


# ---- FP8 (torch._scaled_mm runs on CPU and computes exactly the dequantised product) ----


@pytest.mark.parametrize("dtype,fmax", [(torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)])
def test_quantize_rowwise_tensorwise(dtype, fmax):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    x[3] = 0.0  # an all-zero row must not produce NaN / inf
    mant = 3 if dtype == torch.float8_e4m3fn else 2
    for dims in ((1,), None):
        q, s = fp8.quantize(x, dtype, dims)
        assert q.dtype == dtype and torch.isfinite(s).all()
        amax = x.abs().amax(dim=1, keepdim=True) if dims else x.abs().amax()
        nz = amax > 0
        torch.testing.assert_close(torch.where(nz, s, 0.0), torch.where(nz, amax / fmax, 0.0))  # scale = amax / max
        qmax = q.float().abs().amax(dim=1, keepdim=True) if dims else q.float().abs().amax()
        assert (qmax[nz] == fmax).all()  # the largest |x| of every non-zero slice maps to the largest code
        back = fp8.dequantize(q, s)
        # round-to-nearest keeps half an ulp relative error for normal values; tiny ones fall to subnormals
        normal = x.abs() >= s * 2.0 ** (-6 if dtype == torch.float8_e4m3fn else -14)
        assert ((back - x).abs() <= x.abs() * 2.0 ** -(mant + 1) + 1e-30)[normal].all()
        assert back[3].abs().max() == 0


def fp8_reference(x, w, counts_E, gy, scaling):
    """The recipe written out with explicit dequantisation in float64 (rowwise / tensorwise current scaling)."""
    if x.shape[0] == 0:
        return reference_fp64(x, w, counts_E, gy)  # no rows: empty output, zero gradients
    row = scaling == "rowwise"
    E = w.shape[0]
    expert_N = torch.repeat_interleave(torch.arange(E), counts_E)

    def qdq(t, dt, dims):
        fmax = 448.0 if dt == torch.float8_e4m3fn else 57344.0
        amax = t.abs().amax(dim=dims, keepdim=True) if dims else t.abs().amax()
        s = (amax / fmax).clamp(min=1e-12)
        return ((t / s).clamp(-fmax, fmax).to(dt).double() * s.double())

    xd = qdq(x, torch.float8_e4m3fn, (1,) if row else None)
    wd = qdq(w, torch.float8_e4m3fn, (1,) if row else (1, 2))  # fwd: amax over I per (e, o)
    y = torch.einsum("ni,nio->no", xd, wd[expert_N])
    gd = qdq(gy, torch.float8_e4m3fn if row else torch.float8_e5m2, (1,) if row else None)
    wd2 = qdq(w, torch.float8_e4m3fn, (2,) if row else (1, 2))  # dgrad: amax over O per (e, i)
    gx = torch.einsum("no,nio->ni", gd, wd2[expert_N])
    gw = torch.zeros(w.shape, dtype=torch.float64).index_add_(
        0, expert_N, torch.einsum("ni,no->nio", x.double(), gy.double()))  # wgrad stays high precision
    return y, gx, gw


@pytest.mark.parametrize("counts,I,O", GEMM_CASES)
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_grouped_mm_recipe(scaling, counts, I, O):
    x, w, counts_E, gy = gemm_case(counts, I, O, seed=1)
    got = run_gemm(x, w, counts_E, gy, f"fp8_{scaling}")
    for g, r in zip(got, fp8_reference(x, w, counts_E, gy, scaling)):  # same quantised operands: fp32 sum error
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)
    if x.shape[0]:  # and FP8-level agreement with the exact product
        for g, r in zip(got, reference_fp64(x, w, counts_E, gy)):
            assert (g.double() - r).norm() <= 0.1 * r.norm()


def test_pad_groups_roundtrip_and_grad():
    x, _, counts_E, _ = gemm_case([5, 0, 17, 16], 8, 8)
    x.requires_grad_(True)
    for exact in (True, False):
        pad = ((counts_E + 15) // 16 * 16).sum().item() if exact else None
        x_P, counts_pad, pos = fp8.pad_groups(x, counts_E, 16, num_rows=pad)
        assert counts_pad.tolist() == [16, 0, 32, 16] and (pad is None or x_P.shape[0] == 64)
        starts = torch.cumsum(counts_pad, 0) - counts_pad
        for e, (s, c) in enumerate(zip(starts.tolist(), counts_E.tolist())):  # each block starts at its padded offset
            lo = int(counts_E[:e].sum())
            assert torch.equal(x_P[s:s + c], x[lo:lo + c].detach())
        assert x_P.abs().sum() == x.detach().abs().sum()  # pad rows are zero
        (gx,) = torch.autograd.grad(x_P.index_select(0, pos).sum(), x)
        assert torch.equal(gx, torch.ones_like(x))


# ---- GPU-only backends ----


@pytest.mark.skipif(HAS_TE, reason="transformer_engine is installed: the missing-package message cannot be checked")
@pytest.mark.parametrize("backend", ["te", "te_fp8"])
def test_te_missing_gives_install_hint(backend):
    x, w, counts_E, _ = gemm_case([2, 3], 16, 16)
    with pytest.raises(ImportError, match="Transformer Engine"):
        grouped_mm(x, w, counts_E, backend)


@pytest.mark.skipif(not (HAS_TE and torch.cuda.is_available()), reason="needs transformer_engine and a CUDA GPU")
@pytest.mark.parametrize("backend,tol", [("te", 2e-2), ("te_fp8", 0.1)])
def test_te_grouped_linear_on_gpu(backend, tol):
    x, w, counts_E, gy = gemm_case([40, 0, 17, 9], 64, 32)
    got = run_gemm(x.cuda().bfloat16(), w.cuda().bfloat16(), counts_E.cuda(), gy.cuda().bfloat16(), backend)
    for g, r in zip(got, reference_fp64(x, w, counts_E, gy)):
        assert (g.double().cpu() - r).norm() <= tol * r.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_grouped_mm / cuBLAS FP8 need a CUDA GPU")
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_on_gpu(scaling):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9")
    x, w, counts_E, gy = gemm_case([40, 0, 17, 9], 64, 32)
    got = run_gemm(x.cuda().bfloat16(), w.cuda().bfloat16(), counts_E.cuda(), gy.cuda().bfloat16(), f"fp8_{scaling}")
    for g, r in zip(got, reference_fp64(x, w, counts_E, gy)):
        assert (g.double().cpu() - r).norm() <= 0.1 * r.norm()


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")
def test_triton_compiled_on_gpu(monkeypatch):
    # a compiled copy of the module, even while the interpreted one of the `tk` fixture is loaded
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, TRITON_MODULE, raising=False)
    assert not importlib.import_module(TRITON_MODULE).INTERPRETED
    idx, w = make_plan(4096, 8, 64, 0.5, seed=6, all_null_tokens=5)
    idx, w = idx.cuda(), w.cuda()
    ref = run_layer(idx, w, 64, 1000, "torch")
    got = run_layer(idx, w, 64, 1000, "triton")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_config_accepts_gemm_backends():
    for b in ("auto", "grouped_mm", "loop", "te", "te_fp8", "fp8_rowwise", "fp8_tensorwise"):
        validate_moe(MoEConfig(gemm_backend=b))
    with pytest.raises(ValueError, match="gemm_backend"):
        validate_moe(MoEConfig(gemm_backend="cutlass"))


def test_te_fp8_recipe_adds_no_collective_per_gemm(monkeypatch):
    """The TE FP8 recipe must not all-reduce amaxes at every autocast exit (one region per expert GEMM): a stand-in
    transformer_engine records the recipe grouped_gemm builds (TE itself needs CUDA)."""
    import sys
    import types

    from moe_train.kernels import grouped_gemm as GG

    made = {}

    class DelayedScaling:
        def __init__(self, **kw):
            made.update(kw)

    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling, recipe.Format = DelayedScaling, types.SimpleNamespace(HYBRID="hybrid")
    for name, mod in (("transformer_engine", types.ModuleType("transformer_engine")),
                      ("transformer_engine.common", types.ModuleType("transformer_engine.common")),
                      ("transformer_engine.common.recipe", recipe)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(GG, "_TE_RECIPE", None)
    te = types.SimpleNamespace(autocast=lambda enabled, recipe: ("autocast", recipe))
    assert GG._fp8_autocast(te)[0] == "autocast"
    assert made.get("reduce_amax") is False and made["fp8_format"] == "hybrid"
