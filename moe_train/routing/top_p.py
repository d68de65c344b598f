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

import math
from typing import TYPE_CHECKING, Optional

import torch

from moe_train.errors import config_fail
from moe_train.routing.base import BaseRouter, register
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.scores import scale_routed
from moe_train.routing.topk import renormalize, select_topk, variable_k_plan

if TYPE_CHECKING:
    from moe_train.config import MoEConfig


def top_p_keep(sorted_probs_TK: torch.Tensor, p: float) -> torch.Tensor:
    """Which slots of the best-first probabilities a token keeps: the mass before slot j is below p."""
    before_TK = sorted_probs_TK.cumsum(dim=-1) - sorted_probs_TK
    return before_TK < p


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router distribution's entropy (nats), 0 log 0 = 0; 0 for no tokens."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()


@register
class TopPRouter(BaseRouter):
    name = "top_p"
    variable_k = True
    converts_from = ("topk",)  # the same gate: top-p selection over its probabilities (train/build.py)

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg)
        self.top_p = cfg.top_p
        self.k_max = cfg.resolved_k_max
        # Not norm_topk_prob: its default (True, Mixtral's top-k convention) would have silently renormalised the
        # top-p gates, which the method does not; top-p has its own switch (config.py top_p_renormalize).
        self.renormalize = cfg.top_p_renormalize
        self.routed_scaling_factor = cfg.routed_scaling_factor

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

    # ------------------------------------------------------------------------------------------------------
    # facts (routing/base.py)

    @classmethod
    def validate_config(cls, e: MoEConfig, p: str) -> None:
        """A threshold over softmax probabilities (they sum to one), an optional cap k_max."""
        super().validate_config(e, p)
        if not 0 < e.top_p <= 1:
            config_fail(f"{p}.top_p", e.top_p, "must be in (0, 1]: the cumulative router probability a token's "
                        "experts reach")
        if not (e.entropy_loss_coef >= 0 and math.isfinite(e.entropy_loss_coef)):
            config_fail(f"{p}.entropy_loss_coef", e.entropy_loss_coef, "must be a finite number >= 0")
        if not isinstance(e.top_p_renormalize, bool):
            config_fail(f"{p}.top_p_renormalize", e.top_p_renormalize, "must be true (renormalise the kept gates to "
                        "sum to one) or false (the kept experts' raw probabilities, the paper's gates)")
        if not 1 <= cls.resolved_k_max(e) <= e.num_experts:
            config_fail(f"{p}.k_max", e.k_max, f"must be in [1, num_experts={e.num_experts}] or null (no cap)")
        if e.score_func != "softmax" or e.topk_method != "greedy":
            config_fail(f"{p}.router", e.router, "top_p thresholds cumulative softmax probabilities: needs "
                        "score_func: softmax and topk_method: greedy")
        if e.expert_bias_rate > 0 or e.use_expert_bias:
            config_fail(f"{p}.expert_bias_rate", e.expert_bias_rate, "top_p selects by probability mass only: no "
                        "selection bias (expert_bias_rate: 0, use_expert_bias: false)")

    @classmethod
    def validate_unread(cls, e: MoEConfig, p: str) -> None:
        if e.target_true_experts is not None:
            config_fail(f"{p}.target_true_experts", e.target_true_experts, f"a compute budget steers null experts: "
                        f"needs router: null_experts (router is {e.router!r})")

    @classmethod
    def hf_remote_reason(cls, e: MoEConfig) -> Optional[str]:
        return f"top-p routing (p={e.top_p})"

    @classmethod
    def megatron_reason(cls, e: MoEConfig) -> Optional[str]:
        return ("top-p is not wired into the Megatron adapter (VariableKRouting has no top_p threshold field, "
                "_attach_losses no entropy loss); train top-p routing with moe_train's trainer")

    @classmethod
    def describe(cls, e: MoEConfig) -> str:
        return f"{e.num_experts} experts, top-p {e.top_p} (at most {cls.max_slots(e)})"

    def plan_shape(self) -> tuple[int, int]:
        return self.num_experts, self.k_max

    def _selection_bytes(self, Z: int, K: int) -> float:
        # keep mask K (bool, saved by mul); renormalise: its where 1 + denom 4 + w 4K
        return 4 * Z + 4 * Z + 8 * Z + 4 + K + (5 + 4 * K if self.norm_topk_prob else 0)
