"""Expert capacity on a routing plan, single process, against a plain-Python reference of the same rules:
C = ceil(cf * N / E); keep each expert's C largest-weight slots (ties: earlier slot) or its first C slots; with null
experts a dropped pick becomes a null pick (weights renormalised over the kept true picks when norm_topk_prob),
otherwise it is dropped without renormalisation; no capacity -> the plan is untouched."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.moe_layer import MoELayer
from moe_train.routing import build_router
from moe_train.routing.capacity import apply_capacity, load_imbalance

D = 16


def reference_kept(idx_TK, w_TK, E, cf, policy):
    """Set of kept (t, k) slots, by the rules in plain Python."""
    T, K = idx_TK.shape
    w_TK = w_TK.detach()
    slots = [(t, k) for t in range(T) for k in range(K) if idx_TK[t, k] >= 0]  # position order t*K + k
    C = math.ceil(cf * len(slots) / E)
    kept = set()
    for e in range(E):
        mine = [s for s in slots if idx_TK[s] == e]
        if policy == "weight":
            mine.sort(key=lambda s: -float(w_TK[s]))  # Python's sort is stable: ties keep position order
        kept |= set(mine[:C])
    return kept, C


def make_plan(router="topk", seed=0, T=64, **moe):
    torch.manual_seed(seed)
    cfg = MoEConfig(router=router, num_experts=4, **moe)
    r = build_router(D, cfg)
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(std=0.5)
    return r(torch.randn(T, D)), cfg


@pytest.mark.parametrize("policy", ["weight", "position"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("router,moe", [("topk", dict(top_k=2)), ("adak", dict(k_min=0, k_max=3)),
                                        ("null_experts", dict(num_null_experts=4, top_k=3))])
def test_dropped_set_equals_reference(policy, cf, router, moe):
    plan, cfg = make_plan(router, **moe)
    out = apply_capacity(plan, cf, policy, null_experts=router == "null_experts")
    kept_ref, C = reference_kept(plan.expert_idx_TK, plan.weight_TK, 4, cf, policy)
    kept = {(t, k) for t, k in (out.expert_idx_TK >= 0).nonzero().tolist()}
    assert kept == kept_ref
    assert int(out.extras["capacity"]["capacity"]) == C
    assert (out.counts_E <= C).all() and out.counts_E.tolist() == torch.bincount(
        out.expert_idx_TK[out.expert_idx_TK >= 0], minlength=4).tolist()
    n_true = int((plan.expert_idx_TK >= 0).sum())
    dropped = n_true - len(kept_ref)
    assert int(out.extras["capacity"]["num_dropped"]) == dropped
    assert out.extras["capacity"]["drop_rate"].item() == pytest.approx(dropped / n_true)
    assert (out.expert_idx_TK[out.expert_idx_TK >= 0] == plan.expert_idx_TK[out.expert_idx_TK >= 0]).all()


def test_weight_ties_keep_the_earlier_slot():
    plan, _ = make_plan("topk", top_k=2)
    plan.weight_TK = torch.full_like(plan.weight_TK, 0.5)  # every weight equal: the weight policy = position
    a = apply_capacity(plan, 0.5, "weight")
    b = apply_capacity(plan, 0.5, "position")
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    assert int(a.extras["capacity"]["num_dropped"]) > 0


@pytest.mark.parametrize("norm", [True, False])
def test_overflow_becomes_a_null_pick_with_null_experts(norm):
    plan, cfg = make_plan("null_experts", num_null_experts=4, top_k=3, norm_topk_prob=norm)
    out = apply_capacity(plan, 0.5, "weight", null_experts=True, norm_topk_prob=norm)
    kept = out.expert_idx_TK >= 0
    p = plan.probs_TN.gather(1, plan.expert_idx_TK.clamp(min=0))  # raw router probability of each slot
    p = torch.where(kept, p, torch.zeros_like(p))
    if norm:  # AdaMoE: true weights renormalised over the remaining true picks; none left -> divide by 1
        s = p.sum(1, keepdim=True)
        expected = p / torch.where(s > 0, s, torch.ones_like(s))
    else:
        expected = p
    torch.testing.assert_close(out.weight_TK, expected, rtol=1e-6, atol=1e-7)
    assert (out.weight_TK[~kept] == 0).all()
    assert int(out.extras["capacity"]["num_dropped"]) > 0
    assert out.weight_TK.grad_fn is not None  # differentiable through the renormalisation


def test_without_null_experts_drops_are_not_renormalised():
    plan, _ = make_plan("topk", top_k=2)
    out = apply_capacity(plan, 0.5, "weight")
    kept = out.expert_idx_TK >= 0
    assert torch.equal(out.weight_TK[kept], plan.weight_TK[kept])
    assert (out.weight_TK[~kept] == 0).all() and (~kept).any()
    assert (out.weight_TK.sum(1) < 1 - 1e-6).any()  # tokens that lost a pick keep their reduced weight sum


def test_dropless_returns_the_plan_untouched():
    plan, _ = make_plan("topk", top_k=2)
    assert apply_capacity(plan, None) is plan
    with pytest.raises(ValueError, match="capacity_factor"):
        apply_capacity(plan, 0.0)
    with pytest.raises(ValueError, match="drop_policy"):
        apply_capacity(plan, 1.0, "random")


def test_load_imbalance():
    imb = load_imbalance(torch.tensor([4, 0, 2, 2]), ep_size=2)
    assert imb["expert_max_over_mean"].item() == pytest.approx(2.0)
    assert imb["rank_max_over_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("router,moe", [("null_experts", dict(num_null_experts=4, top_k=3)), ("topk", dict(top_k=2))])
def test_moe_layer_applies_capacity_when_configured(router, moe):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=D, intermediate_size=24,
                      moe=MoEConfig(router=router, num_experts=4, capacity_factor=0.5, **moe))
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    x = torch.randn(1, 48, D)
    y, plan = layer(x)
    C = int(plan.extras["capacity"]["capacity"])
    assert (plan.counts_E <= C).all() and int(plan.extras["capacity"]["num_dropped"]) > 0
    # float64, token by token, over the slots the plan kept with the weights it carries
    ex = layer.experts
    wg, wu, wd = (w.double() for w in (ex.w_gate, ex.w_up, ex.w_down))
    xt = x[0].double()
    ref = torch.zeros_like(xt)
    for t, k in (plan.expert_idx_TK >= 0).nonzero().tolist():
        e = int(plan.expert_idx_TK[t, k])
        ref[t] += plan.weight_TK[t, k].double() * ((F.silu(xt[t] @ wg[e]) * (xt[t] @ wu[e])) @ wd[e])
    torch.testing.assert_close(y[0].double(), ref, rtol=1e-5, atol=1e-5)
    layer.moe_cfg.capacity_factor = None
    _, plan_free = layer(x)
    assert "capacity" not in plan_free.extras and plan_free.counts_E.sum() > plan.counts_E.sum()
