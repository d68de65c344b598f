"""DeepEP indices for Megatron's flex dispatcher (parallel/megatron/flex.py) against moe_train's routing plans.

The plan is the reference: its true slots (expert_idx_TK >= 0) are what must travel. From the plan we build the
[T, E] routing map and probabilities as Megatron's router hands them over, then check that deepep_topk returns
exactly each token's true experts with their gate weights, -1 (probability 0) everywhere else, and so as many
dispatched rows as true assignments, where Megatron's own topk conversion would send T * K.
"""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the flex helper lives in "
                                            "moe_train.parallel.megatron)")

from moe_train.config import MoEConfig  # noqa: E402
from moe_train.parallel.megatron.flex import deepep_topk, use_deepep_indices  # noqa: E402
from moe_train.routing import build_router  # noqa: E402


def plan_of(router: str, seed: int = 0, T: int = 64, D: int = 16, **moe):
    torch.manual_seed(seed)
    cfg = MoEConfig(router=router, num_experts=8, **moe)
    r = build_router(D, cfg)
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(std=1.0)
    x = torch.randn(T, D)
    x[::5] *= 0  # some tokens at exactly equal scores
    with torch.no_grad():
        plan = r(x)
    return plan, cfg


def megatron_inputs(plan, E: int):
    """routing_map [T, E] (True = a true pick) and probs [T, E] (its gate weight), as VariableKRouter returns them."""
    T, K = plan.expert_idx_TK.shape
    true_TK = plan.expert_idx_TK >= 0
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    probs = torch.zeros(T, E)
    rows = torch.arange(T)[:, None].expand(T, K)
    routing_map[rows[true_TK], plan.expert_idx_TK[true_TK]] = True
    probs[rows[true_TK], plan.expert_idx_TK[true_TK]] = plan.weight_TK[true_TK].float()
    return routing_map, probs


@pytest.mark.parametrize("router, moe, max_slots", [
    ("null", dict(num_null_experts=8, top_k=4), 4),  # AdaMoE: some tokens pick only null experts
    ("topk", dict(top_k=2), 2),
    ("adak", dict(k_min=0, k_max=3, top_k=2), 3),  # Ada-K: k = 0 tokens have no slot at all
    ("null", dict(num_null_experts=8, top_k=4), 10),  # more slots than experts: the extra ones are -1
])
def test_indices_are_the_plans_true_slots_and_minus_one_elsewhere(router, moe, max_slots):
    plan, cfg = plan_of(router, **moe)
    E = cfg.num_experts
    routing_map, probs = megatron_inputs(plan, E)
    idx, p = deepep_topk(routing_map, probs, max_slots)
    assert idx.shape == p.shape == (routing_map.shape[0], max_slots) and idx.dtype == torch.int64
    assert p.dtype == torch.float32
    for t in range(idx.shape[0]):
        true = sorted(int(e) for e in plan.expert_idx_TK[t] if e >= 0)
        got = [int(e) for e in idx[t] if e >= 0]
        assert got == true, (t, got, true)  # the token's true experts, ascending, first
        assert all(int(e) == -1 for e in idx[t, len(true):])  # then -1 only
        weights = {int(e): float(w) for e, w in zip(plan.expert_idx_TK[t], plan.weight_TK[t]) if e >= 0}
        assert [float(x) for x in p[t, :len(true)]] == [weights[e] for e in got]
        assert (p[t, len(true):] == 0).all()
    rows_sent = int((idx >= 0).sum())
    assert rows_sent == int((plan.expert_idx_TK >= 0).sum()) == int(plan.counts_E.sum())
    # Megatron's own conversion (torch.topk over the probabilities, no -1 without a capacity factor) sends T * K
    _, mega_idx = torch.topk(probs, min(max_slots, E), dim=-1)
    if router != "topk":
        assert mega_idx.numel() > rows_sent


def test_a_token_with_more_picks_than_slots_is_caught():
    routing_map = torch.zeros(3, 4, dtype=torch.bool)
    routing_map[1, :3] = True
    with pytest.raises(RuntimeError, match="more true experts than max_slots"):
        deepep_topk(routing_map, torch.rand(3, 4), 2)


def test_only_deepep_managers_are_changed():
    class _DeepepManager:  # the name Megatron's flex dispatcher gives its DeepEP manager
        num_experts, router_topk = 4, 2

    disp = type("D", (), {"_comm_manager": _DeepepManager()})()
    assert use_deepep_indices(disp, 3) and disp._comm_manager.router_topk == 3
    rm = torch.tensor([[True, False, False, True], [False, False, False, False]])
    disp._comm_manager.setup_metadata(rm, rm.float() * 0.5)
    assert disp._comm_manager.token_indices.tolist() == [[0, 3, -1], [-1, -1, -1]]
    other = type("D", (), {"_comm_manager": type("_HybridEPManager", (), {})()})()
    assert not use_deepep_indices(other, 3) and not use_deepep_indices(object(), 3)
