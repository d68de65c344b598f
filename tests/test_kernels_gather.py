"""Sort-free build and gather-based permute / combine (kernels/gather_combine.py, the torch path of kernels/permute.py)
against independent float64 references; the Triton permutation kernels (interpreter) against the same references.

References: a pure-python stable sort (rows), and dense float64 matrices built slot by slot in python: the combine is
out = A @ y with A[t, row of slot (t, k)] = w[t, k], the permute x_ND = B @ x with B[row, t] = 1. Autograd through
those matrices gives the reference gradients of y, w and x.
Shape legend: T tokens, K slots per token, D hidden, E experts, N true rows.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from moe_train.kernels import gather_combine as GC

P = importlib.import_module("moe_train.kernels.permute")
HAS_TRITON = importlib.util.find_spec("triton") is not None

PLANS = [  # (T, K, E, null_frac, all_null_tokens)
    (37, 3, 5, 0.3, 4),
    (50, 8, 40, 0.5, 3),  # E > COUNTING_MAX_EXPERTS: the stable-sort build
    (9, 2, 3, 1.0, 0),  # every slot null: N = 0
    (16, 1, 4, 0.0, 0),
    (0, 4, 4, 0.0, 0),  # T = 0
]


def make_plan(T, K, E, null_frac, all_null, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)  # duplicates within a token allowed: the build must not care
    idx[torch.rand(T, K, generator=g) < null_frac] = -1
    idx[:all_null] = -1
    w = torch.rand(T, K, generator=g, dtype=torch.float64) * (idx >= 0)
    return idx, w


def python_rows(idx_TK, E):
    flat = idx_TK.reshape(-1).tolist()
    slots = [s for e in range(E) for s, v in enumerate(flat) if v == e]
    row = [-1] * len(flat)
    for r, s in enumerate(slots):
        row[s] = r
    return slots, row


def dense_reference(idx, w, E, D, seed=1):
    """(x_ND, out, grad x, grad w, grad y) through dense float64 matrices built in python."""
    T, K = idx.shape
    slots, row = python_rows(idx, E)
    N = len(slots)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(T, D, generator=g, dtype=torch.float64)
    gperm = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = w.clone().requires_grad_(True)
    B = torch.zeros(N, T, dtype=torch.float64)
    for r, s in enumerate(slots):
        B[r, s // K] = 1.0
    # A[t, row] = w[t, k] for each true slot (t, k): built entry by entry, differentiable in w
    entries = [(s // K, r, s) for s, r in enumerate(row) if r >= 0]
    wA = torch.zeros(T, N, dtype=torch.float64)
    if entries:
        t_i, r_i, s_i = (torch.tensor(v, dtype=torch.long) for v in zip(*entries))
        wA = wA.index_put((t_i, r_i), w.reshape(-1)[s_i])
    x_ND = B @ x
    out = wA @ y
    gx, = torch.autograd.grad(x_ND, x, gperm)
    gy, gw = torch.autograd.grad(out, (y, w), gout, allow_unused=True)
    return dict(x=x.detach(), y=y.detach(), w=w.detach(), gout=gout, gperm=gperm, x_ND=x_ND.detach(),
                out=out.detach(), gx=gx, gy=gy, gw=torch.zeros_like(w) if gw is None else gw)


def run(backend, idx, w, E, ref):
    perm = P.build_permutation(idx, E, backend=backend)
    x = ref["x"].clone().requires_grad_(True)
    y = ref["y"].clone().requires_grad_(True)
    w = ref["w"].clone().requires_grad_(True)
    x_ND = P.permute(x, perm, backend=backend)
    gx, = torch.autograd.grad(x_ND, x, ref["gperm"])
    out = P.unpermute_combine(y, perm, w, idx.shape[0], backend=backend)
    gy, gw = torch.autograd.grad(out, (y, w), ref["gout"])
    return dict(x_ND=x_ND.detach(), out=out.detach(), gx=gx, gy=gy, gw=gw)


@pytest.mark.parametrize("T,K,E,null_frac,all_null", PLANS)
def test_torch_build_is_the_stable_order(T, K, E, null_frac, all_null):
    idx, _ = make_plan(T, K, E, null_frac, all_null)
    perm = P.build_permutation(idx, E, backend="torch")
    slots, row = python_rows(idx, E)
    assert perm.slot_N.tolist() == slots and perm.row_TK.reshape(-1).tolist() == row
    assert perm.token_N.tolist() == [s // K for s in slots]
    true_slots = [s for s in range(T * K) if row[s] >= 0]
    assert perm.slots_Ns.tolist() == true_slots and perm.rows_Ns.tolist() == [row[s] for s in true_slots]
    n_true = [(idx[t] >= 0).sum().item() for t in range(T)]
    assert perm.offsets_T.tolist() == [sum(n_true[:t]) for t in range(T)]
    # with num_rows known (no host sync), the same permutation
    perm2 = P.build_permutation(idx, E, backend="torch", num_rows=len(slots))
    assert torch.equal(perm2.slot_N, perm.slot_N) and torch.equal(perm2.row_TK, perm.row_TK)


def test_counting_pass_and_sort_agree(monkeypatch):
    idx, _ = make_plan(200, 4, 16, 0.3, 5, seed=7)
    counting = P.build_permutation(idx, 16, backend="torch")
    monkeypatch.setattr(GC, "COUNTING_MAX_EXPERTS", 0)  # force the stable-sort build
    sort = P.build_permutation(idx, 16, backend="torch")
    for f in ("slot_N", "token_N", "counts_E", "row_TK", "slots_Ns", "rows_Ns", "offsets_T"):
        assert torch.equal(getattr(counting, f), getattr(sort, f)), f


@pytest.mark.parametrize("T,K,E,null_frac,all_null", PLANS)
@pytest.mark.parametrize("D", [1, 13])
def test_torch_gather_values_and_grads_vs_dense_fp64(T, K, E, null_frac, all_null, D):
    idx, w = make_plan(T, K, E, null_frac, all_null, seed=2)
    ref = dense_reference(idx, w, E, D)
    got = run("torch", idx, w, E, ref)
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12, msg=k)
    assert (got["gw"][idx < 0] == 0).all()
    if all_null:
        assert got["out"][:all_null].abs().max() == 0 and got["gx"][:all_null].abs().max() == 0


def test_gather_functions_gradcheck():
    idx, w = make_plan(5, 3, 4, 0.3, 1, seed=3)
    perm = P.build_permutation(idx, 4, backend="torch")
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(perm.num_rows, 3, dtype=torch.float64, requires_grad=True)
    w = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: P.permute(a, perm, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda a, b: P.unpermute_combine(a, perm, b, 5, backend="torch"), (y, w))


def test_bf16_rows_accumulate_in_fp32_and_runs_are_identical():
    idx, w = make_plan(64, 8, 6, 0.2, 0, seed=4)
    perm = P.build_permutation(idx, 6, backend="torch")
    y = torch.randn(perm.num_rows, 40, dtype=torch.bfloat16)
    out = P.unpermute_combine(y, perm, w.float(), 64, backend="torch")
    wA = torch.zeros(64, perm.num_rows, dtype=torch.float64)
    wA[perm.token_N, torch.arange(perm.num_rows)] = w.reshape(-1)[perm.slot_N].bfloat16().double()
    torch.testing.assert_close(out.double(), wA @ y.double(), rtol=8e-3, atol=8e-3)  # one bf16 rounding at the end
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, P.unpermute_combine(y, perm, w.float(), 64, backend="torch"))  # deterministic


def test_combine_rejects_mismatched_token_count():
    idx, w = make_plan(4, 2, 3, 0.0, 0)
    perm = P.build_permutation(idx, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        P.unpermute_combine(torch.randn(perm.num_rows, 2, dtype=torch.float64), perm, w, 5)


@pytest.fixture(scope="module")
def tk():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop("moe_train.kernels.triton_permute", None)
    mod = importlib.import_module("moe_train.kernels.triton_permute")
    assert mod.INTERPRETED
    yield mod
    sys.modules.pop("moe_train.kernels.triton_permute", None)
    mp.undo()


@pytest.mark.parametrize("T,K,E,null_frac,all_null", PLANS[:3])
def test_triton_gather_kernels_vs_dense_fp64(tk, T, K, E, null_frac, all_null):
    idx, w = make_plan(T, K, E, null_frac, all_null, seed=5)
    ref = dense_reference(idx, w, E, 13)
    got = run("triton", idx, w, E, ref)
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12, msg=k)
