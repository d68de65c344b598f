"""The routing plan: what every router returns and every dispatcher consumes.

Shape legend: T tokens, K slots per token (Kmax), E true experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RoutingPlan:
    """One layer's routing decision.

    expert_idx_TK: int64, the true expert of each slot, -1 for a null pick or an unused slot (never computed).
    weight_TK:     float32 gate weight of each slot, 0 where expert_idx_TK is -1; differentiable.
    counts_E:      int64 number of true assignments per expert (on device: no host sync): the rows that run.
    selected_counts_E: int64 per-expert true selections made by the router, BEFORE capacity drops; set by the
                   router, left untouched by capacity (routing/capacity.py). The aux-loss-free expert bias reacts to
                   it: after drops an overloaded expert can look exactly average. Defaults to counts_E.
    aux_loss / z_loss: unweighted balancing terms (scalar tensors); the model applies the coefficients.
    probs_TN:      router probabilities over the n true (+ m null) experts (fp32), for loss terms and statistics.
    logits_TN:     the router logits behind probs_TN (the gate's dtype), for a z-loss over a subset of the tokens
                   (the Megatron router leaves padding out: routing/balancing.py::router_z_loss).
    Ada-K only: action_T (chosen action index), log_prob_T (log pi(action | x)), entropy_T.
    Null experts that return something (null_kind identity / constant, routing/zero_compute.py), else None:
    null_idx_TK:    int64, the null expert (0..Z-1) of each null pick, -1 elsewhere; the pick's expert_idx_TK is
                   still -1 and its weight_TK 0, so no dispatcher sees it.
    null_weight_TK: float32 gate weight of each null pick, 0 elsewhere; differentiable. The MoE layer adds
                   zero_compute.null_expert_output(x, null_idx_TK, null_weight_TK, null_kind) on the token's rank.
    null_kind:     config.NULL_KINDS ("zero" when the null fields are None).
    """

    expert_idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    counts_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    probs_TN: Optional[torch.Tensor] = None
    logits_TN: Optional[torch.Tensor] = None
    action_T: Optional[torch.Tensor] = None
    log_prob_T: Optional[torch.Tensor] = None
    entropy_T: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)
    selected_counts_E: Optional[torch.Tensor] = None
    null_idx_TK: Optional[torch.Tensor] = None
    null_weight_TK: Optional[torch.Tensor] = None
    null_kind: str = "zero"

    def __post_init__(self):
        if self.selected_counts_E is None:  # a plan no capacity has touched: selections are the assignments
            self.selected_counts_E = self.counts_E

    @property
    def num_tokens(self) -> int:
        return self.expert_idx_TK.shape[0]

    @property
    def true_mask_TK(self) -> torch.Tensor:
        return self.expert_idx_TK >= 0

    @property
    def true_experts_per_token_T(self) -> torch.Tensor:
        """Number of true experts each token uses (float, for averaging)."""
        return self.true_mask_TK.sum(dim=-1).float()

    @property
    def num_assignments(self) -> torch.Tensor:
        """Total true (token, expert) assignments: the rows that reach the expert GEMMs."""
        return self.counts_E.sum()


def counts_from_idx(expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-expert count of true slots; -1 slots land in an extra bucket that is dropped."""
    flat = expert_idx_TK.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    return torch.bincount(key, minlength=num_experts + 1)[:num_experts]
