"""One-pass routing (kernels/routing.py + kernels/triton_routing.py): the Triton kernel under TRITON_INTERPRET=1 and
the torch path against a float64 per-token python reference (values and gradients), the routers wired to the kernel
against their torch path, and the backend / config rules.
Shape legend: T tokens, N = E true + Z null experts, K picks, D hidden.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from moe_train.config import ConfigError, MoEConfig, validate_moe
from moe_train.kernels import routing as R

MODULE = "moe_train.kernels.triton_routing"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def tr():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop(MODULE, None)
    mod = importlib.import_module(MODULE)
    assert mod.INTERPRETED
    yield mod
    sys.modules.pop(MODULE, None)
    mp.undo()


def reference(z, k, E, bias, norm, score_func):
    """Per token in python, float64: scores, picks by (score + bias) descending then index, null mask, weights."""
    s = torch.sigmoid(z) if score_func == "sigmoid" else torch.softmax(z, dim=-1)
    T, N = z.shape
    picks = [sorted(range(N), key=lambda n: (-(s[t, n].item() + (bias[n].item() if bias is not None else 0)), n))[:k]
             for t in range(T)]
    rows = []
    for t in range(T):
        p = torch.stack([s[t, n] * (n < E) for n in picks[t]]) if k else s.new_zeros(0)
        den = p.sum()
        rows.append(p / den if norm and den > 0 else p)
    w = torch.stack(rows) if T else s.new_zeros(0, k)
    idx = torch.tensor([[n if n < E else -1 for n in pk] for pk in picks], dtype=torch.long).reshape(T, k)
    counts = torch.bincount(torch.tensor([n for pk in picks for n in pk], dtype=torch.long), minlength=N)
    return s, w, idx, counts


def case(T, N, seed, ties=False, null_heavy=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, N, generator=g, dtype=torch.float64) * 2
    if ties:
        z[:, 1] = z[:, 0]  # exact ties: the lower index must win
        z[:, N - 1] = z[:, 2]
    z[:null_heavy, :6] -= 20  # these tokens pick only null experts (E = 6); scores stay distinct in fp32
    return z


CASES = [  # (T, N, E, k, score_func, norm, bias, ties, null_heavy)
    (37, 10, 6, 3, "softmax", True, True, False, 3),
    (20, 10, 6, 4, "softmax", False, False, True, 0),
    (19, 8, 8, 2, "sigmoid", True, True, False, 0),
    (17, 10, 6, 2, "sigmoid", False, False, True, 2),
    (0, 8, 8, 2, "softmax", True, False, False, 0),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("T,N,E,k,score_func,norm,use_bias,ties,null_heavy", CASES)
def test_route_values_and_grads_vs_fp64_reference(tr, backend, T, N, E, k, score_func, norm, use_bias, ties,
                                                  null_heavy):
    z = case(T, N, seed=T + N, ties=ties, null_heavy=null_heavy)
    bias = torch.linspace(-0.05, 0.05, N, dtype=torch.float64) if use_bias else None
    z32 = z.float().requires_grad_(True)
    got = R.route_topk(z32, k, E, None if bias is None else bias.float(), norm, score_func, backend=backend)
    z64 = z.float().double().requires_grad_(True)  # the same fp32 logits, computed in float64
    s, w, idx, counts = reference(z64, k, E, bias, norm, score_func)
    assert torch.equal(got.expert_idx_TK, idx) and torch.equal(got.counts_N, counts)
    torch.testing.assert_close(got.probs_TN.double(), s.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.weight_TK.double(), w.detach(), rtol=1e-6, atol=1e-7)
    if null_heavy:
        assert (got.expert_idx_TK[:null_heavy] == -1).all() and (got.weight_TK[:null_heavy] == 0).all()
    if T:
        gen = torch.Generator().manual_seed(9)
        gw, gp = torch.randn(T, k, generator=gen, dtype=torch.float64), torch.randn(T, N, generator=gen,
                                                                                     dtype=torch.float64)
        g_got, = torch.autograd.grad((got.weight_TK.double() * gw).sum() + (got.probs_TN.double() * gp).sum(), z32)
        g_ref, = torch.autograd.grad((w * gw).sum() + (s * gp).sum(), z64)
        torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-6)


def test_kernel_several_programs_and_bf16_logits(tr):
    z = case(45, 12, seed=5).bfloat16()
    ref = R.route_topk(z, 3, 8, None, True, "softmax", backend="torch")
    probs, w, idx, counts, _ = tr.route(z, 3, 8, None, True, "softmax", block_t=4)  # 12 programs, a ragged last one
    assert torch.equal(idx, ref.expert_idx_TK) and torch.equal(counts, ref.counts_N)
    torch.testing.assert_close(w, ref.weight_TK, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs, ref.probs_TN, rtol=1e-6, atol=1e-7)


NAN = float("nan")


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # numpy, inside the interpreter's tl.max of a NaN row
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_kernel_nan_logits_pick_like_the_reference(tr, score_func, use_bias):
    """A NaN score ranks above every number (torch.sort / torch.topk), lowest index first among NaNs: a NaN token
    picks real experts with NaN weights (the NaN reaches the loss) instead of becoming an all-null token, and every
    pick is counted inside counts_N (the old kernel picked the padding column: counts summed to 6 of 8 here)."""
    T, N, E, k = 4, 8, 6, 2
    z = case(T, N, seed=3).float()
    z[0] = NAN  # softmax and sigmoid: every score NaN
    z[1, 3] = NAN  # softmax: the whole row NaN; sigmoid: expert 3 first, then the best finite one
    z[3, 7] = NAN  # a null expert's logit: sigmoid picks it first (weight 0 * NaN = NaN, as the reference)
    z[3, 6] = -NAN  # the other NaN sign bit ranks the same
    bias = torch.linspace(-0.05, 0.05, N) if use_bias else None
    probs, w, idx, counts, pick = tr.route(z, k, E, bias, True, score_func, block_t=2)
    ref = R.route_topk_torch(z, k, E, bias, True, score_func)
    assert int(counts.sum()) == T * k and bool(((pick >= 0) & (pick < N)).all())
    assert torch.equal(counts, ref.counts_N) and torch.equal(idx, ref.expert_idx_TK)
    assert bool(((idx >= -1) & (idx < E)).all())
    assert torch.equal(idx[0], torch.tensor([0, 1]))  # all NaN: the lowest indices, true experts
    torch.testing.assert_close(w, ref.weight_TK, rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(probs, ref.probs_TN, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert bool(w[0].isnan().all()) and bool(w[2].isfinite().all())


def test_kernel_minus_inf_scores_stay_pickable(tr):
    """-inf scores (a -inf bias) are still picked, in index order, once the finite ones are taken, and never a taken
    column twice (the old kernel marked taken columns -inf too, and re-picked column 0)."""
    T, N, E, k = 3, 8, 8, 4
    z = case(T, N, seed=4).float()
    bias = torch.full((N,), float("-inf"))
    bias[5] = 0.0
    got = tr.route(z, k, E, bias, False, "softmax")
    ref = R.route_topk_torch(z, k, E, bias, False, "softmax")
    assert torch.equal(got[2], ref.expert_idx_TK) and torch.equal(got[3], ref.counts_N)
    assert torch.equal(got[2][0], torch.tensor([5, 0, 1, 2]))
    torch.testing.assert_close(got[1], ref.weight_TK, rtol=1e-6, atol=1e-7)


def test_kernel_refuses_more_picks_than_experts(tr):
    with pytest.raises(ValueError, match="top_k"):
        tr.route(torch.zeros(2, 4), 5, 4)


def test_route_config_bounds_the_tile(tr):
    """route_config (the launch parameters route() uses, compiled by tests/test_kernels_aot.py): at most
    TILE_PER_THREAD elements of a [BLOCK_T, BLOCK_N] tile per thread, at least one token per program."""
    for N in (1, 8, 64, 128, 160, 256, 512, 768, 1024, 4096):
        for K in (1, 2, 8, 12):
            if K > N:
                continue
            cfg = tr.route_config(N, K)
            assert cfg["BLOCK_N"] >= N and cfg["BLOCK_K"] >= K and 1 <= cfg["BLOCK_T"] <= tr.BLOCK_T
            per_thread = cfg["BLOCK_T"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
            assert cfg["BLOCK_T"] == 1 or per_thread <= tr.TILE_PER_THREAD


@pytest.mark.parametrize("router,extra", [("topk", {}), ("null", dict(num_null_experts=4, expert_bias_rate=0.01)),
                                          ("null", dict(num_null_experts=4, norm_topk_prob=False,
                                                        score_func="sigmoid"))])
def test_router_on_the_kernel_matches_its_torch_path(tr, monkeypatch, router, extra):
    from moe_train.routing import build_router

    calls = []
    route = tr.route
    monkeypatch.setattr(tr, "route", lambda *a, **k: calls.append(1) or route(*a, **k))
    plans = []
    for backend in ("torch", "triton"):
        cfg = MoEConfig(router=router, num_experts=4, top_k=3, routing_backend=backend, **extra)
        validate_moe(cfg)
        torch.manual_seed(0)
        r = build_router(16, cfg)
        if r.expert_bias is not None:
            r.expert_bias.copy_(torch.tensor([0.01, -0.02, 0.0, 0.03]))
        x = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
        plan = r(x)
        loss = (plan.weight_TK * torch.arange(3.0)).sum() + plan.aux_loss
        plans.append((plan, torch.autograd.grad(loss, [p for p in r.parameters()])))
    (a, ga), (b, gb) = plans
    assert len(calls) == 1  # the triton-configured router ran the kernel, the torch one did not
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK) and torch.equal(a.counts_E, b.counts_E)
    torch.testing.assert_close(b.weight_TK, a.weight_TK, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.probs_TN, a.probs_TN, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-6, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_backend_rules(monkeypatch):
    z = torch.randn(4, 6)
    with pytest.raises(ValueError, match="not one of"):
        R.route_topk(z, 2, 6, backend="cuda")
    monkeypatch.setattr(R, "_triton_kernels", lambda: (_ for _ in ()).throw(AssertionError("triton used")))
    R.route_topk(z, 2, 6, backend="auto")  # CPU: the torch path, triton untouched
    assert R.route_fused(z, MoEConfig(routing_backend="auto"), 2, 6) is None  # the router runs its own path
    with pytest.raises(ValueError, match="true_first"):
        R.use_triton("triton", z, "topk")


@pytest.mark.parametrize("extra,why", [(dict(router="adak"), "router 'adak'"),
                                       (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2), "group"),
                                       (dict(router="null_experts", num_null_experts=4, null_kind="identity"), "identity"),
                                       (dict(router="null_experts", num_null_experts=4, null_tie_break="topk"), "tie")])
def test_config_refuses_triton_routing_outside_the_kernel_math(extra, why):
    validate_moe(MoEConfig(routing_backend="auto", **extra))  # auto: the torch path, accepted
    with pytest.raises(ConfigError, match=f"routing_backend.*{why}"):
        validate_moe(MoEConfig(routing_backend="triton", **extra))
    with pytest.raises(ConfigError, match="routing_backend"):
        validate_moe(MoEConfig(routing_backend="fast"))
