"""Expert capacity on a routing plan: at most C rows per expert, overflow dropped.

    C = ceil(capacity_factor * N / E),   N = true assignments in the batch the plan covers, E true experts
    dropless when capacity_factor is None (the plan is returned unchanged)

Which slots overflow (``drop_policy``): ``weight`` keeps each expert's C slots with the largest gate weight
(``plan.weight_TK``, the weight the output is combined with; ties keep the earlier slot), ``position`` keeps the
first C slots in token order (slot t*K + k), as Switch/GShard do.

What a dropped slot becomes:
  * with null experts (router ``null_experts``): a null pick: slot -1, and when ``norm_topk_prob`` the remaining true
    weights are renormalised over the remaining true picks, exactly as if the router had picked a null expert
    there (a token left with no true pick outputs 0); without ``norm_topk_prob`` the other weights are kept.
    With identity / constant null experts (null_kind) a null pick has a weight of its own, so a dropped slot is
    dropped as below (the remaining true and null weights kept as they are).
  * otherwise (``topk``, ``adak``): dropped: slot -1, weight 0, and the remaining weights are NOT renormalised
    (Switch/GShard/Megatron semantics: the token's output simply loses that expert's term).
The balancing loss keeps the router's own picks (computed before capacity). ``counts_E`` is recomputed (the
rows that run); ``selected_counts_E`` (the router's selections, which the expert bias reacts to) is kept.

Under expert parallelism the capacity is per rank-local batch (as Megatron-Core and DeepSpeed-MoE do): every rank
applies it to its own plan before dispatch, with N its own true assignments, so no communication is needed and
an expert receives at most C_p rows from each source rank p.
Shape legend (docs/shapes.md): T tokens, K slots, E true experts, M = T*K flat slots.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe_train.kernels.routing import renormalize
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.registry import router_class

# Which overflowing slots are dropped (module docstring): the one list (config.py types drop_policy with it).
DROP_POLICIES = ("weight", "position")


def expert_capacity(num_assignments: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """C = ceil(cf * N / E), an int64 scalar tensor on N's device (no host sync), computed in float64."""
    return torch.ceil(num_assignments.to(torch.float64) * capacity_factor / num_experts).to(torch.int64)


def capacity_keep_mask(expert_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int,
                       capacity_TK: torch.Tensor | int, drop_policy: str = "weight") -> torch.Tensor:
    """bool [T,K]: true slots that fit within their expert's capacity under ``drop_policy``."""
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} is not allowed: one of {DROP_POLICIES}")
    E = num_experts
    idx_M = expert_idx_TK.reshape(-1)
    M = idx_M.numel()
    dev = idx_M.device
    if drop_policy == "weight":
        # Largest weight first; a stable sort keeps the earlier slot first among equal weights.
        order_M = torch.argsort(-weight_TK.detach().reshape(-1).float(), stable=True)
    else:
        order_M = torch.arange(M, device=dev)
    key_M = torch.where(idx_M < 0, E, idx_M)[order_M]
    by_expert = torch.argsort(key_M, stable=True)
    order_M, key_M = order_M[by_expert], key_M[by_expert]
    counts = torch.bincount(key_M, minlength=E + 1)
    start = torch.cumsum(counts, 0) - counts
    rank_in_expert_M = torch.arange(M, device=dev) - start[key_M]
    keep_sorted = (rank_in_expert_M < capacity_TK) & (key_M < E)
    keep_M = torch.empty_like(keep_sorted)
    keep_M[order_M] = keep_sorted
    return keep_M.view_as(expert_idx_TK)


def apply_capacity(plan: RoutingPlan, capacity_factor: Optional[float], drop_policy: str = "weight", *,
                   null_experts: bool = False, norm_topk_prob: bool = True) -> RoutingPlan:
    """Returns a new plan with each expert's overflow dropped (see the module docstring); stats in
    ``plan.extras['capacity']``: capacity, dropped_E, num_dropped, num_assignments (before), drop_rate."""
    if capacity_factor is None:
        return plan
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0, or None for dropless routing")
    E = plan.counts_E.numel()
    true_TK = plan.expert_idx_TK >= 0
    num_before = true_TK.sum()
    cap = expert_capacity(num_before, E, capacity_factor)
    keep_TK = capacity_keep_mask(plan.expert_idx_TK, plan.weight_TK, E, cap, drop_policy)
    if null_experts and norm_topk_prob:
        weight_TK = renormalize(plan.weight_TK, keep_TK)  # as if each dropped pick had been a null pick
    else:
        weight_TK = plan.weight_TK * keep_TK
    expert_idx_TK = torch.where(keep_TK, plan.expert_idx_TK, torch.full_like(plan.expert_idx_TK, -1))
    dropped_E = counts_from_idx(torch.where(true_TK & ~keep_TK, plan.expert_idx_TK, -1), E)
    num_dropped = dropped_E.sum()
    stats = {"capacity": cap, "dropped_E": dropped_E, "num_dropped": num_dropped, "num_assignments": num_before,
             "drop_rate": num_dropped.float() / num_before.clamp_min(1).float()}
    return dataclasses.replace(plan, expert_idx_TK=expert_idx_TK, weight_TK=weight_TK,
                               counts_E=counts_from_idx(expert_idx_TK, E),
                               extras={**plan.extras, "capacity": stats})


def apply_capacity_from_config(plan: RoutingPlan, moe_cfg) -> RoutingPlan:
    """apply_capacity with a MoEConfig's capacity_factor / drop_policy / router / norm_topk_prob."""
    return apply_capacity(plan, moe_cfg.capacity_factor, moe_cfg.drop_policy,
                          null_experts=router_class(moe_cfg.router).capacity_drops_to_null(moe_cfg),
                          norm_topk_prob=moe_cfg.norm_topk_prob)


def load_imbalance(counts_E: torch.Tensor, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """max/mean of the per-expert load and of the per-rank load (experts contiguous per rank) for counts that are
    already summed over the batch of interest (e.g. all-reduced over the ranks). 1.0 is perfect balance."""
    c = counts_E.to(torch.float64)
    rank_P = c.view(ep_size, -1).sum(1)
    def ratio(v):
        return v.max() / v.mean().clamp_min(1e-12)
    return {"expert_max_over_mean": ratio(c), "rank_max_over_mean": ratio(rank_P)}
