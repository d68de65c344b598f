"""Top-k routing: the baseline, in the Mixtral, Qwen and DeepSeek gate conventions.

    z = W_g x,  p = softmax(z) or sigmoid(z) (fp32, score_func),  idx = topk(p + b, k),  w = p[idx]
    w <- w / sum(w)          if norm_topk_prob (Mixtral: always; Qwen1.5-MoE, DeepSeek-V2: norm_topk_prob=False)
    w <- w * routed_scaling_factor        (DeepSeek; 1 otherwise)
    group-limited routing (DeepSeek topk_method) restricts idx to the best expert groups (routing/scores.py)

b is the optional aux-loss-free expert bias (selection only, never in w).
Among exactly equal scores the lower index ranks first (select_topk, kernels/routing.py), so the selection is the same on every device
and dtype (torch.topk leaves that order to the implementation).
Shape legend: T tokens, D hidden, E true experts, K slots per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

# select_topk / renormalize: the one selection of every router, owned by the kernel's reference (kernels/routing.py)
from moe_train.kernels.routing import renormalize, select_topk  # noqa: F401 - re-exported for the routers
from moe_train.routing.balancing import load_balancing_loss, router_z_loss
from moe_train.routing.base import BaseRouter, register
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.scores import scale_routed, score_distribution

if TYPE_CHECKING:
    from moe_train.config import MoEConfig


def variable_k_plan(idx_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor, probs_TE: torch.Tensor,
                    logits_TE: torch.Tensor, num_experts: int, **fields) -> RoutingPlan:
    """The plan of a router that keeps a per-token subset ``keep_TK`` of its ranked picks (Ada-K's first k, top-p's
    smallest set reaching p): unkept slots become -1 (``weight_TK`` is already 0 there), the counts and the balancing
    terms follow the kept picks. ``fields``: the router's own RoutingPlan fields (policy, extras)."""
    expert_idx_TK = torch.where(keep_TK, idx_TK, torch.full_like(idx_TK, -1))
    counts_E = counts_from_idx(expert_idx_TK, num_experts)
    return RoutingPlan(
        expert_idx_TK=expert_idx_TK,
        weight_TK=weight_TK,
        counts_E=counts_E,
        aux_loss=load_balancing_loss(probs_TE, counts_E),
        z_loss=router_z_loss(logits_TE),
        probs_TN=probs_TE,
        logits_TN=logits_TE,
        **fields,
    )


def group_limited(e: MoEConfig) -> bool:
    """Whether the config's topk_method leaves some expert groups out (not the one-pass kernel's selection)."""
    return e.topk_method != "greedy" and e.topk_group < e.n_group


@register
class TopKRouter(BaseRouter):
    name = "topk"
    trains_expert_bias = True

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg)
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        # Aux-loss-free balancing state (DeepSeek-V3's e_score_correction_bias); a buffer so it is checkpointed and
        # moves with the model.
        self.register_expert_bias(cfg)

    def forward(self, x_TD: torch.Tensor) -> RoutingPlan:
        c = self.moe_cfg
        logits_TE = self.gate(x_TD)
        # the one-pass kernel where routing_backend selects it and the math is its plain top-k (kernels/routing.py)
        fused = self.route_fused(logits_TE, self.top_k, self.expert_bias)
        if fused is None:  # the torch path: every convention
            scores_TE, weight_TK, idx_TK = self.select(logits_TE, self.top_k, self.expert_bias)
            if self.norm_topk_prob:
                weight_TK = renormalize(weight_TK, torch.ones_like(weight_TK))
        else:
            scores_TE, weight_TK, idx_TK = fused.probs_TN, fused.weight_TK, fused.expert_idx_TK
        weight_TK = scale_routed(weight_TK, c.routed_scaling_factor)
        probs_TE = score_distribution(scores_TE, c.score_func)
        counts_E = counts_from_idx(idx_TK, self.num_experts) if fused is None else fused.counts_N
        return RoutingPlan(
            expert_idx_TK=idx_TK,
            weight_TK=weight_TK,
            counts_E=counts_E,
            selected_counts_E=counts_E,
            aux_loss=load_balancing_loss(probs_TE, counts_E),
            z_loss=router_z_loss(logits_TE),
            probs_TN=probs_TE,
            logits_TN=logits_TE,
        )

    @classmethod
    def kernel_excluded(cls, e: MoEConfig) -> str:
        return f"topk_method {e.topk_method!r} (group-limited selection)" if group_limited(e) else ""

    @classmethod
    def adak_base_reason(cls, e: MoEConfig) -> str:
        return ""

    def plan_shape(self) -> tuple[int, int]:
        return self.num_experts, self.top_k

    def _saved_ids(self, K: int, Z: int) -> int:
        return Z  # idx_TK is the first K columns of the stable sort's order
