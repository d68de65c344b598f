"""Routers against hand computations: top-k conventions, AdaMoE null experts, Ada-K allocator, balancing terms."""

import math

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.routing import AdaKRouter, NullExpertRouter, TopKRouter
from moe_train.routing.balancing import load_balancing_loss, router_z_loss, update_expert_bias

D = 16


def set_gate(router, w):
    with torch.no_grad():
        router.gate.weight.copy_(w)


def test_topk_mixtral_convention_matches_hand_computation():
    torch.manual_seed(0)
    r = TopKRouter(D, MoEConfig(num_experts=4, top_k=2))
    x = torch.randn(5, D)
    plan = r(x)
    for t in range(5):
        logits = (r.gate.weight @ x[t]).tolist()
        ex = [math.exp(v) for v in logits]
        p = [v / sum(ex) for v in ex]
        best = sorted(range(4), key=lambda i: -p[i])[:2]
        assert plan.expert_idx_TK[t].tolist() == best
        s = p[best[0]] + p[best[1]]
        assert plan.weight_TK[t].tolist() == pytest.approx([p[best[0]] / s, p[best[1]] / s], abs=1e-6)
    assert plan.counts_E.sum().item() == 10


def test_topk_qwen_convention_keeps_raw_probabilities():
    torch.manual_seed(0)
    r = TopKRouter(D, MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False))
    x = torch.randn(3, D)
    plan = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    assert torch.allclose(plan.weight_TK, probs.gather(1, plan.expert_idx_TK), atol=1e-6)


def two_by_two_null_router():
    """2 true + 2 null experts, k=2, null logits = -true logits. Token 0 prefers true experts 0 and 1, token 1
    the nulls, token 2 one true + one null."""
    r = NullExpertRouter(2, MoEConfig(router="null_experts", num_experts=2, num_null_experts=2, top_k=2))
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        r.null_gate.weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    return r, torch.tensor([[2.0, 1.5], [-2.0, -1.5], [2.0, -2.0]])


def test_null_router_all_null_token_and_renormalisation_over_true_picks():
    r, x = two_by_two_null_router()
    plan = r(x)
    idx = plan.expert_idx_TK.tolist()
    assert sorted(idx[0]) == [0, 1]
    assert idx[1] == [-1, -1]  # every pick null
    assert sorted(idx[2]) == [-1, 0]
    assert plan.weight_TK[1].tolist() == [0.0, 0.0]
    # token 0: renormalised over its two true picks
    e = [math.exp(v) for v in (2.0, 1.5, -2.0, -1.5)]
    assert plan.weight_TK[0].tolist() == pytest.approx([e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])], abs=1e-6)
    # token 2: one true pick (expert 0) keeps weight 1 after renormalisation, null slot weight 0
    w2 = dict(zip(idx[2], plan.weight_TK[2].tolist()))
    assert w2[0] == pytest.approx(1.0) and w2[-1] == 0.0
    assert plan.counts_E.tolist() == [2, 1]
    assert plan.true_experts_per_token_T.tolist() == [2.0, 0.0, 1.0]


def test_null_router_loss_terms_against_hand_computation():
    r, x = two_by_two_null_router()
    plan = r(x)
    logits = [[a, b, -a, -b] for a, b in x.tolist()]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    # selections: token0 {0,1}, token1 {2,3}, token2 {0, null 3}  -> counts [2, 1, 1, 2]
    counts = [0, 0, 0, 0]
    for row in probs:
        for i in sorted(range(4), key=lambda i: -row[i])[:2]:
            counts[i] += 1
    assert counts == [2, 1, 1, 2]
    c_tilde = [counts[0], counts[1], (counts[2] + counts[3]) / 2, (counts[2] + counts[3]) / 2]
    f = [c / sum(c_tilde) for c in c_tilde]
    P = [sum(row[i] for row in probs) / 3 for i in range(4)]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, P))
    assert plan.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    assert plan.z_loss.item() == pytest.approx(z, rel=1e-5)


def test_null_router_with_zero_null_experts_equals_topk_exactly():
    torch.manual_seed(1)
    for norm in (True, False):
        top = TopKRouter(D, MoEConfig(num_experts=8, top_k=3, norm_topk_prob=norm))
        null = NullExpertRouter(D, MoEConfig(router="null_experts", num_experts=8, num_null_experts=0, top_k=3,
                                             norm_topk_prob=norm))
        set_gate(null, top.gate.weight)
        x = torch.randn(64, D)
        a, b = top(x), null(x)
        assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
        assert torch.equal(a.weight_TK, b.weight_TK)
        assert torch.equal(a.counts_E, b.counts_E)
        assert torch.allclose(a.aux_loss, b.aux_loss)


def test_null_gate_initialised_from_true_gate():
    r = NullExpertRouter(D, MoEConfig(router="null_experts", num_experts=4, num_null_experts=8, top_k=4))
    r.init_null_gate_from_true()
    assert torch.equal(r.null_gate.weight, torch.cat([r.gate.weight, r.gate.weight]))
    bad = NullExpertRouter(D, MoEConfig(router="null_experts", num_experts=4, num_null_experts=6, top_k=4))
    with pytest.raises(ValueError, match="multiple of num_experts"):
        bad.init_null_gate_from_true()


def make_adak(k_min=1, k_max=None, E=8):
    torch.manual_seed(2)
    return AdaKRouter(D, MoEConfig(router="adak", num_experts=E, top_k=2, k_min=k_min, k_max=k_max))


def test_adak_distribution_greedy_sampled_and_log_probs():
    r = make_adak()
    x = torch.randn(200, D)
    logits = x @ r.allocator.weight.T
    pi = torch.softmax(logits, -1)
    assert torch.allclose(pi.sum(-1), torch.ones(200))
    plan = r(x)  # greedy
    assert torch.equal(plan.action_T, pi.argmax(-1))
    assert torch.equal(plan.true_experts_per_token_T, (1 + pi.argmax(-1)).float())
    assert torch.allclose(plan.log_prob_T, pi.log().gather(1, plan.action_T[:, None]).squeeze(1), atol=1e-6)
    r.set_mode("sample")
    torch.manual_seed(3)
    sampled = r(x)
    assert not torch.equal(sampled.action_T, plan.action_T)  # near-uniform policy: samples differ from argmax
    assert torch.allclose(sampled.log_prob_T, pi.log().gather(1, sampled.action_T[:, None]).squeeze(1), atol=1e-6)
    assert torch.allclose(sampled.entropy_T, -(pi * pi.log()).sum(-1), atol=1e-5)
    # the log-prob is differentiable w.r.t. the allocator only
    sampled.log_prob_T.sum().backward()
    assert r.allocator.weight.grad is not None and r.allocator.weight.grad.abs().sum() > 0
    # forced mode reproduces stored actions
    r.set_mode("forced", sampled.action_T)
    forced = r(x)
    assert torch.equal(forced.expert_idx_TK, sampled.expert_idx_TK)
    assert torch.allclose(forced.log_prob_T, sampled.log_prob_T)
    with pytest.raises(ValueError):
        r.set_mode("forced")


def test_adak_slots_follow_frozen_router_topk():
    r = make_adak(k_min=0)
    x = torch.randn(50, D)
    r.set_mode("sample")
    plan = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    order = probs.argsort(-1, descending=True)
    for t in range(50):
        k = plan.action_T[t].item()  # k_min = 0
        assert plan.expert_idx_TK[t, :k].tolist() == order[t, :k].tolist()
        assert (plan.expert_idx_TK[t, k:] == -1).all()
        if k:
            w = probs[t, order[t, :k]]
            assert torch.allclose(plan.weight_TK[t, :k], w / w.sum(), atol=1e-6)
        assert plan.weight_TK[t, k:].abs().sum() == 0


def test_adak_k_max_everywhere_equals_topk_k_max():
    r = make_adak(k_max=3)
    top = TopKRouter(D, MoEConfig(num_experts=8, top_k=3))
    set_gate(top, r.gate.weight)
    x = torch.randn(40, D)
    r.set_mode("forced", torch.full((40,), 2))  # action 2 <-> k = k_min + 2 = 3
    a, b = r(x), top(x)
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    assert torch.allclose(a.weight_TK, b.weight_TK)


def test_expert_bias_selects_but_does_not_weight():
    r = TopKRouter(D, MoEConfig(num_experts=4, top_k=1, expert_bias_rate=0.1))
    x = torch.randn(30, D)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # huge bias: everyone picks expert 3
    plan = r(x)
    assert (plan.expert_idx_TK == 3).all()
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    assert torch.allclose(plan.weight_TK, torch.ones(30, 1))  # top-1 renormalised
    r2 = TopKRouter(D, MoEConfig(num_experts=4, top_k=2, expert_bias_rate=0.1, norm_topk_prob=False))
    r2.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    p2 = r2(x)
    assert torch.allclose(p2.weight_TK, torch.softmax(x @ r2.gate.weight.T, -1).gather(1, p2.expert_idx_TK))
    update_expert_bias(r.expert_bias, torch.tensor([5, 1, 3, 3]), rate=0.1)  # mean 3
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 10.0])
    del probs


def test_balancing_loss_uniform_is_one_and_normalised_by_actual_assignments():
    probs = torch.full((10, 4), 0.25)
    assert load_balancing_loss(probs, torch.tensor([5, 5, 5, 5])).item() == pytest.approx(1.0)
    # same distribution of counts at half the number of assignments: same loss (normalised by actual count)
    assert load_balancing_loss(probs, torch.tensor([1, 1, 1, 1])).item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, torch.zeros(4, dtype=torch.long)).item() == 0.0
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
