"""Ada-K routing (arXiv 2410.10456): a per-layer allocator picks k for every token over a frozen top-k router.

    P(k | x) = softmax(x W_p),  W_p in R^{D x A},  actions a = 0..A-1  <->  k = k_min + a,  A = k_max - k_min + 1
    inference: k = k_min + argmax_a P;   training (PPO): a ~ P, with log P(a | x) returned for the ratio
    the frozen router's experts: idx = topk(softmax(W_g x), k_max)[:, :k], gates renormalised over those k
    when the base model does (norm_topk_prob), else its raw probabilities; the base's score function, expert bias,
    group limits and routed scaling apply as in its top-k router (routing/scores.py)
    with z null experts (a frozen null router, e.g. LongCat-Flash's identity experts): the ranking is over all
    n + z (softmax over n + z, selection biases over all, the null router's tie order), a token takes the first k
    of it, and split_null_slots applies the null kind's gate rule to those k picks (routing/zero_compute.py):
    identity / constant picks return gate * x / gate * v_j on the token's rank, never dispatched; k counts picks,
    the plan's true slots (what the PPO penalty and the FLOPs count) only the FFN ones (docs/adak.md)

The allocator is one bias-free linear map per layer (Qwen1.5-MoE: 2048 * 60 * 24 layers = 2.95M parameters).
Modes: ``greedy`` (argmax), ``sample`` (a ~ P), ``forced`` (use ``forced_action_T``, to recompute log-probs of
stored actions in PPO epochs).
Sampling is by inverse CDF: a = the number of actions whose cumulative probability is below u, for one uniform
u in [0, 1) per token. The trainer passes the uniforms (``uniform_T``), drawn for the whole global batch from one
generator, so the sampled actions do not depend on how the batch is split over ranks (moe_train/train/adak.py);
without them the global torch RNG supplies u.
Precision: the allocator always computes in fp32 (the hidden state is upcast, the weight is read as fp32: the
trainer keeps it as an fp32 master weight even on a bf16 model), and so do log pi and the entropy; the gate
keeps the model's dtype (its probabilities are fp32 as for every router).
The plan carries the full allocator log-probabilities as ``extras["allocator_log_probs_TA"]`` (differentiable in
W_p), for the warm start's cross-entropy.
Shape legend: T tokens, D hidden, E true experts, Z null experts, N = E + Z, K = k_max slots, A actions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.errors import config_fail
from moe_train.routing.balancing import load_balancing_loss, router_z_loss
from moe_train.routing.base import BaseRouter, register
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.scores import scale_routed, score_distribution
from moe_train.routing.topk import renormalize, variable_k_plan
from moe_train.routing.zero_compute import split_null_slots

if TYPE_CHECKING:
    from moe_train.config import MoEConfig

MODES = ("greedy", "sample", "forced")


@register
class AdaKRouter(BaseRouter):
    name = "adak"
    ranks_null_experts = True  # over a frozen null router's ranking (LongCat-Flash)
    variable_k = True
    learns_k = True

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg)
        self.k_min = cfg.k_min
        self.k_max = cfg.resolved_k_max
        self.norm_topk_prob = cfg.norm_topk_prob
        # The frozen base router's selection-only bias (DeepSeek-V3's e_score_correction_bias; never updated here)
        self.register_expert_bias(cfg)  # frozen under Ada-K: never updated (trains_expert_bias False)
        # The frozen null router's null experts, under NullExpertRouter's names (module docstring; none when z = 0)
        Z = cfg.num_null_experts
        self.num_null, self.null_kind, self.tie_break = Z, cfg.null_kind, cfg.null_tie_break
        self.null_gate = nn.Linear(hidden_size, Z, bias=False) if Z else None
        self.register_buffer("null_expert_bias", torch.zeros(Z) if cfg.use_expert_bias and Z else None)
        self.null_values = nn.Parameter(torch.zeros(Z, hidden_size)) if Z and cfg.null_kind == "constant" else None
        self.allocator = nn.Linear(hidden_size, self.k_max - self.k_min + 1, bias=False)
        self.mode = "greedy"
        self.forced_action_T: Optional[torch.Tensor] = None
        self.uniform_T: Optional[torch.Tensor] = None

    def set_mode(self, mode: str, forced_action_T: Optional[torch.Tensor] = None,
                 uniform_T: Optional[torch.Tensor] = None) -> None:
        """``forced_action_T``: the actions of mode 'forced'; ``uniform_T``: optional uniforms in [0, 1) of mode
        'sample' (one per token; default: drawn from the global torch RNG at each forward)."""
        if mode not in MODES:
            raise ValueError(f"Ada-K mode {mode!r}: expected one of {MODES}")
        if (mode == "forced") != (forced_action_T is not None):
            raise ValueError("Ada-K mode 'forced' needs forced_action_T, and only that mode takes it")
        if uniform_T is not None and mode != "sample":
            raise ValueError(f"uniform_T is for mode 'sample', not {mode!r}")
        self.mode, self.forced_action_T, self.uniform_T = mode, forced_action_T, uniform_T

    def forward(self, x_TD: torch.Tensor) -> RoutingPlan:
        c = self.moe_cfg
        if self.num_null:  # one GEMM over true + null gates, as NullExpertRouter (tied twins stay tied)
            return self._forward_with_nulls(x_TD)
        logits_TE = self.gate(x_TD)
        scores_TE, weight_TK, idx_TK = self.select(logits_TE, self.k_max, self.expert_bias)
        probs_TE = score_distribution(scores_TE, c.score_func)
        log_pi_TA, action_T = self._allocate(x_TD)
        k_T = self.k_min + action_T
        keep_TK = torch.arange(self.k_max, device=x_TD.device) < k_T[:, None]
        weight_TK = renormalize(weight_TK, keep_TK) if self.norm_topk_prob else weight_TK * keep_TK
        weight_TK = scale_routed(weight_TK, c.routed_scaling_factor)
        return variable_k_plan(idx_TK, weight_TK, keep_TK, probs_TE, logits_TE, self.num_experts,
                               **self._policy_fields(log_pi_TA, action_T))

    def _forward_with_nulls(self, x_TD: torch.Tensor) -> RoutingPlan:
        """The first k of the frozen null router's ranking over all n + z experts (module docstring)."""
        c, E = self.moe_cfg, self.num_experts
        logits_TN = F.linear(x_TD, torch.cat([self.gate.weight, self.null_gate.weight]))
        bias_N = None if self.expert_bias is None else torch.cat([self.expert_bias, self.null_expert_bias])
        scores_TN, weight_TK, idx_TK = self.select(logits_TN, self.k_max, bias_N, self.tie_break)
        log_pi_TA, action_T = self._allocate(x_TD)
        keep_TK = torch.arange(self.k_max, device=x_TD.device) < (self.k_min + action_T)[:, None]
        # dropped slots: index -1 (a "true" slot of no expert) and weight 0, then the kind's gate rule
        expert_idx_TK, weight_TK, null_idx_TK, null_weight_TK = split_null_slots(
            weight_TK * keep_TK, torch.where(keep_TK, idx_TK, -1), E, self.null_kind, self.norm_topk_prob)
        weight_TK = scale_routed(weight_TK, c.routed_scaling_factor)
        if null_weight_TK is not None:
            null_weight_TK = scale_routed(null_weight_TK, c.routed_scaling_factor)
        probs_TN = score_distribution(scores_TN, c.score_func)
        counts_N = counts_from_idx(torch.where(keep_TK, idx_TK, -1), E + self.num_null)
        return RoutingPlan(
            expert_idx_TK=expert_idx_TK, weight_TK=weight_TK, counts_E=counts_N[:E], selected_counts_E=counts_N[:E],
            aux_loss=load_balancing_loss(probs_TN, counts_N, num_null=self.num_null),
            z_loss=router_z_loss(logits_TN), probs_TN=probs_TN, logits_TN=logits_TN,
            null_idx_TK=null_idx_TK, null_weight_TK=null_weight_TK, null_kind=self.null_kind,
            **self._policy_fields(log_pi_TA, action_T),
        )

    def _allocate(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi_TA, action_T) under the current mode (module docstring)."""
        # fp32 whatever the model's dtype (module docstring): bf16 logits would quantise log pi and the PPO ratio
        log_pi_TA = torch.log_softmax(F.linear(x_TD.float(), self.allocator.weight.float()), dim=-1)
        if self.mode == "greedy":
            action_T = log_pi_TA.argmax(dim=-1)
        elif self.mode == "sample":
            u_T = self.uniform_T
            if u_T is None:
                u_T = torch.rand(x_TD.shape[0], device=x_TD.device)
            assert u_T.shape == log_pi_TA.shape[:1], (u_T.shape, log_pi_TA.shape)
            cdf_TA = log_pi_TA.detach().exp().cumsum(dim=-1)
            # inverse CDF; the clamp covers u above a last cumulative value rounded just below 1
            action_T = (cdf_TA < u_T.to(cdf_TA)[:, None]).sum(dim=-1).clamp(max=log_pi_TA.shape[-1] - 1)
        else:
            assert self.forced_action_T is not None and self.forced_action_T.shape == log_pi_TA.shape[:1]
            action_T = self.forced_action_T
        return log_pi_TA, action_T

    @staticmethod
    def _policy_fields(log_pi_TA: torch.Tensor, action_T: torch.Tensor) -> dict:
        """The plan's allocator fields: action, its log-prob, the policy entropy, the full log-probs."""
        return dict(
            action_T=action_T,
            # not a view: FSDP2 warns about (and an in-place op would break) view outputs that require grad
            log_prob_T=log_pi_TA.gather(-1, action_T[:, None]).squeeze(-1).clone(),
            entropy_T=-(log_pi_TA.exp() * log_pi_TA).sum(dim=-1),
            extras={"allocator_log_probs_TA": log_pi_TA},
        )

    # ------------------------------------------------------------------------------------------------------
    # facts (routing/base.py)

    @classmethod
    def resolved_k_max(cls, e: MoEConfig) -> int:
        return cls.pickable_experts(e) if e.k_max is None else e.k_max

    @classmethod
    def validate_config(cls, e: MoEConfig, p: str) -> None:
        super().validate_config(e, p)
        pickable = cls.pickable_experts(e)
        if e.k_min < 0:
            config_fail(f"{p}.k_min", e.k_min, "must be >= 0")
        if not 1 <= cls.resolved_k_max(e) <= pickable:
            config_fail(f"{p}.k_max", e.k_max, f"must be in [1, {pickable}] (num_experts + num_null_experts)")
        if e.k_min > cls.resolved_k_max(e):
            config_fail(f"{p}.k_min", e.k_min, f"must be <= k_max={cls.resolved_k_max(e)}")

    @classmethod
    def worst_true_experts(cls, e: MoEConfig) -> int:
        return cls.resolved_k_max(e)  # the planner's worst case is the allocator's cap as configured

    @classmethod
    def hf_remote_reason(cls, e: MoEConfig) -> Optional[str]:
        return "an Ada-K allocator (a per-token k)"

    @classmethod
    def gate_flops_per_token(cls, e: MoEConfig, D: int, extras: bool = True) -> float:
        # its allocator, and the null gate of a frozen null router (LongCat-Flash)
        return 2 * D * e.num_experts + ((2 * D * (cls.resolved_k_max(e) - e.k_min + 1) + 2 * D * e.num_null_experts)
                                        if extras else 0)

    @classmethod
    def describe(cls, e: MoEConfig) -> str:
        return f"{e.num_experts} experts, k in [{e.k_min}, {cls.resolved_k_max(e)}] (Ada-K allocator)"

    @classmethod
    def baseline_k(cls, e: MoEConfig) -> Optional[int]:
        return e.top_k  # the frozen base router's own k

    def plan_shape(self) -> tuple[int, int]:
        return self.num_experts, self.k_max

    def _own_bytes(self, D: int, c: float) -> float:
        A = self.k_max - self.k_min + 1
        return (4 * D if c != 4 else 0) + 4 * A  # the allocator's fp32 input (cast from c) and its log-probs


@contextmanager
def routing_mode(routers: Sequence[AdaKRouter], mode: str, actions: Optional[Sequence[torch.Tensor]] = None,
                 uniforms: Optional[Sequence[torch.Tensor]] = None) -> Iterator[None]:
    """Every router in ``mode`` for the forwards inside the block (``actions[l]``: layer l's forced actions;
    ``uniforms[l]``: its sampling uniforms), back to greedy, the inference mode, on exit, also after an error."""
    try:
        for i, r in enumerate(routers):
            r.set_mode(mode, None if actions is None else actions[i], None if uniforms is None else uniforms[i])
        yield
    finally:
        for r in routers:
            r.set_mode("greedy")
