"""Top-p ("dynamic") routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models", arXiv 2403.07652): every token takes the SMALLEST set of experts whose summed router probability reaches p.

    z = W_g x,  p = softmax(z) (fp32),  (p_(1) >= p_(2) >= ...) the probabilities sorted, best first
    k_t = min{ k : p_(1) + ... + p_(k) >= p }  capped at k_max (default: every expert)
        i.e. slot j is kept iff the probability mass BEFORE it is < p (the first slot always)
    w = p of the kept slots, raw (the default, top_p_renormalize: false: the paper's and its released code's
        gates) or renormalised over them (top_p_renormalize: true, e.g. to continue a norm_topk_prob top-k model),
        then times routed_scaling_factor (routing/scores.py scale_routed, as every router: a top-k model with
        DeepSeek's factor continued as top-p keeps its gate scale)
    dynamic loss  L_d = mean_t ( - sum_i p_{t,i} log p_{t,i} )    (the router entropy, MINIMISED with weight
        entropy_loss_coef: without it the router can flatten p and buy more experts per token for free)

The plan has K = k_max slots, unused ones -1 (weight 0): a variable-k plan that every dispatcher (local, all-to-all)
consumes like the null and Ada-K ones; unused slots are never permuted, sent or computed.
The released inference code (ZhenweiAn/Dynamic_MoE, modeling_moe.py) keeps experts up to the first whose cumulative
probability EXCEEDS p (strict >); the paper's definition, used here, stops where the sum REACHES p (>=): they differ
only when a prefix sum equals p exactly.
Ties: experts of exactly equal probability rank by index (select_topk's stable sort), as for every router.
Shape legend: T tokens, D hidden, E experts, K slots per token (k_max).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.config import MoEConfig
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.scores import scale_routed
from moe_train.routing.topk import renormalize, select_topk, variable_k_plan


def top_p_keep(sorted_probs_TK: torch.Tensor, p: float) -> torch.Tensor:
    """Which slots of the best-first probabilities a token keeps: the mass before slot j is below p."""
    before_TK = sorted_probs_TK.cumsum(dim=-1) - sorted_probs_TK
    return before_TK < p


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router distribution's entropy (nats), 0 log 0 = 0; 0 for no tokens."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()


class TopPRouter(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_p = cfg.top_p
        self.k_max = cfg.resolved_k_max
        # Not norm_topk_prob: its default (True, Mixtral's top-k convention) would have silently renormalised the
        # top-p gates, which the method does not; top-p has its own switch (config.py top_p_renormalize).
        self.renormalize = cfg.top_p_renormalize
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)

    @property
    def norm_topk_prob(self) -> bool:
        """Whether the kept gates are renormalised (planner/activations.py sizes the renormalisation's memory)."""
        return self.renormalize

    def forward(self, x_TD: torch.Tensor) -> RoutingPlan:
        logits_TE = self.gate(x_TD)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weight_TK, idx_TK = select_topk(probs_TE, self.k_max)
        keep_TK = top_p_keep(weight_TK.detach(), self.top_p)
        weight_TK = renormalize(weight_TK, keep_TK) if self.renormalize else weight_TK * keep_TK
        weight_TK = scale_routed(weight_TK, self.routed_scaling_factor)
        return variable_k_plan(idx_TK, weight_TK, keep_TK, probs_TE, logits_TE, self.num_experts,
                               extras={"entropy_loss": router_entropy(probs_TE)})
