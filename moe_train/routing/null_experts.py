"""AdaMoE null experts (arXiv 2406.13233): m zero-cost experts join the n true experts.

    z = [W_g ; W_null] x              (n true logits, then m null logits from a separate linear map, in ONE GEMM)
    p = softmax(z) in fp32,  (w, idx) = topk(p + [b; c], k)     over n + m experts
    (b: optional aux-loss-free expert bias; c: optional compute-budget bias shared by the nulls, budget.py)
    w'_i = w_i / sum_{picked true j} w_j   for true picks (norm_topk_prob), null picks -> slot -1, weight 0
    a token whose picks are all null divides by 1 and outputs 0 (only the residual passes)
    y = sum_{picked true i} w'_i E_i(x)

Ties (``null_tie_break``, NULL_TIE_BREAKS below). The AdaMoE conversion starts every null gate as an exact copy
of a true gate (W_null = W_g repeated r = m/n times), so each true expert has r null twins of EQUAL score. Both gates
go through one GEMM over their concatenated weights, so a twin's logit comes from the same kernel with the same
reduction over D as its true expert's (bit-identical on CPU in fp32 and bf16, tests/test_routing_fixes.py; CUDA not
yet measured), and the default ``true_first`` ranks a true expert before its twins at equal score
(a stable sort, the same on every device and dtype). At step 0 a token's k picks are then its best true expert,
its r twins, its second true expert, ...: ceil(k / (r + 1)) true experts, the best ones of the original router,
and renormalised over the true picks their gates are the original top-k gates. For Mixtral n=8, m=16, k=4 that is
the original top-2 model, function for function (io/convert.py refuses conversions where it would not be).
``topk`` leaves ties to torch.topk, as the authors' code does (device- and dtype-dependent true experts at step 0).

What a null pick returns is ``null_kind`` (zero_compute.NULL_KINDS; routing/zero_compute.py, docs/zero_compute.md): the
above is ``zero`` (AdaMoE); ``identity`` / ``constant`` picks return gate * x / gate * v_j, their gates are real gate
weights (normalised over ALL k picks with norm_topk_prob) and the plan carries them in null_idx_TK / null_weight_TK.

Balancing: load_balancing_loss with the m null counts averaged into one shared bucket, so it steers the total null
usage toward m/(n+m) of the selections (about k*n/(n+m) true experts per token). With m = 0 this router is the
top-k router exactly. With norm_topk_prob=False (Qwen1.5-MoE convention) the true picks keep their raw p.
Shape legend (docs/shapes.md, with its exceptions for N and L):
T tokens, D hidden, E = n true experts, Z = m null experts, N = E + Z, K slots per token.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.errors import config_fail
from moe_train.kernels.routing import TIE_BREAKS
from moe_train.routing.balancing import load_balancing_loss, router_z_loss
from moe_train.routing.base import BaseRouter, register
from moe_train.routing.budget import null_bias_limits, update_null_bias
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.scores import scale_routed, score_distribution
from moe_train.routing.topk import group_limited
from moe_train.routing.zero_compute import split_null_slots

if TYPE_CHECKING:
    from moe_train.config import MoEConfig

# How the null router ranks experts of EXACTLY equal score (AdaMoE's twin-initialised null gates tie bit for bit
# with their true expert after conversion). The one list of allowed values (config.py types null_tie_break with it);
# kernels/routing.py:select_topk applies it.
#   true_first: a stable descending sort, so at equal score a true expert ranks before every null expert (and a
#               lower index before a higher one): deterministic on every device and dtype, and a converted top-k
#               model is function-preserving before training (moe_train/io/convert.py checks when it can be).
#   topk:       torch.topk decides, as the authors' code does: with exact twins the number of true experts a token
#               gets at step 0 depends on the device and dtype (e.g. ~1.25-1.45 instead of 2 for Mixtral, m=16, k=4).
NULL_TIE_BREAKS = TIE_BREAKS


def null_gate_from_true(weight_ED: torch.Tensor, num_null: int, experts_field: str = "num_experts") -> torch.Tensor:
    """AdaMoE's initialisation of the null gate: W_null [m, D] = W_g [n, D] repeated r = m/n times, so every true
    expert starts with r null twins of equal logit (the module docstring: ties). The one implementation, used by
    NullExpertRouter.init_null_gate_from_true (io/convert.py) and the Megatron router / checkpoint conversion
    (parallel/megatron). ``experts_field`` names the caller's config field for n in the error message."""
    E = weight_ED.shape[0]
    if num_null % E:
        raise ValueError(f"null-gate initialisation from the true gate needs num_null_experts (={num_null}) to be a "
                         f"multiple of {experts_field} (={E})")
    return weight_ED.repeat(num_null // E, 1)


@register
class NullExpertRouter(BaseRouter):
    name = "null_experts"
    aliases = ("null",)  # its name until 2026-12: configs and checkpoints written before still load
    ranks_null_experts = True
    trains_expert_bias = True
    converts_from = ("topk",)  # AdaMoE conversion on load (io/convert.py add_null_experts)

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__(hidden_size, cfg)
        self.num_null = cfg.num_null_experts
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.tie_break = cfg.null_tie_break
        self.null_gate = nn.Linear(hidden_size, cfg.num_null_experts, bias=False) if cfg.num_null_experts else None
        # What a null pick returns (routing/zero_compute.py); constant: one learned vector per null expert, from 0
        # (the MoE layer's combine reads it; a dense parameter like the gates).
        self.null_kind = cfg.null_kind
        self.null_values = (nn.Parameter(torch.zeros(cfg.num_null_experts, hidden_size))
                            if cfg.null_kind == "constant" else None)
        self.register_expert_bias(cfg)
        # With use_expert_bias (DeepSeek-V3's correction bias), a fixed selection offset per null expert: the
        # AdaMoE conversion sets it to its twin's expert bias, so a twin still ties with its true expert
        # (io/convert.py); the aux-loss-free update trains the true experts' bias only.
        self.register_buffer("null_expert_bias", torch.zeros(cfg.num_null_experts)
                             if cfg.use_expert_bias and cfg.num_null_experts else None)
        # Compute budget (routing/budget.py): one selection bias shared by the null experts, and its PI integral.
        self.target_true_experts = cfg.target_true_experts
        self.budget_kp, self.budget_ki = cfg.budget_kp, cfg.budget_ki
        budget = cfg.target_true_experts is not None
        self.register_buffer("null_bias", torch.zeros(()) if budget else None)
        self.register_buffer("null_bias_integral", torch.zeros(()) if budget else None)

    @torch.no_grad()
    def init_null_gate_from_true(self) -> None:
        """W_null = W_g repeated m/n times (null_gate_from_true), in place."""
        self.null_gate.weight.copy_(null_gate_from_true(self.gate.weight, self.num_null))

    def forward(self, x_TD: torch.Tensor) -> RoutingPlan:
        E = self.num_experts
        w_ND = self.gate.weight
        if self.null_gate is not None:  # one GEMM: a null twin's logit is bit-identical to its true expert's
            w_ND = torch.cat([w_ND, self.null_gate.weight])
        logits_TN = F.linear(x_TD, w_ND)
        c = self.moe_cfg
        bias_N = None
        if self.expert_bias is not None or self.null_bias is not None:
            zeros = logits_TN.new_zeros(E, dtype=torch.float32)  # the fp32 scores' dtype
            true_b = self.expert_bias if self.expert_bias is not None else zeros
            null_b = (self.null_bias if self.null_bias is not None else zeros[0]).expand(self.num_null)
            if self.null_expert_bias is not None:
                null_b = null_b + self.null_expert_bias
            bias_N = torch.cat([true_b, null_b])
        # the one-pass kernel where routing_backend selects it and the math is its plain top-k (kernels/routing.py)
        fused = self.route_fused(logits_TN, self.top_k, bias_N, self.tie_break)
        if fused is None:  # the torch path: every convention
            scores_TN, weight_TK, idx_TK = self.select(logits_TN, self.top_k, bias_N, self.tie_break)
            expert_idx_TK, weight_TK, null_idx_TK, null_weight_TK = split_null_slots(
                weight_TK, idx_TK, E, self.null_kind, self.norm_topk_prob)
        else:  # null_kind zero (kernel_excluded): null picks output nothing
            scores_TN, weight_TK, expert_idx_TK = fused.probs_TN, fused.weight_TK, fused.expert_idx_TK
            null_idx_TK = null_weight_TK = None
        weight_TK = scale_routed(weight_TK, c.routed_scaling_factor)
        if null_weight_TK is not None:
            null_weight_TK = scale_routed(null_weight_TK, c.routed_scaling_factor)
        probs_TN = score_distribution(scores_TN, c.score_func)
        counts_N = (torch.bincount(idx_TK.reshape(-1), minlength=E + self.num_null) if fused is None
                    else fused.counts_N)
        counts_E = counts_N[:E]
        return RoutingPlan(
            expert_idx_TK=expert_idx_TK,
            weight_TK=weight_TK,
            counts_E=counts_E,
            selected_counts_E=counts_E,
            aux_loss=load_balancing_loss(probs_TN, counts_N, num_null=self.num_null),
            z_loss=router_z_loss(logits_TN),
            probs_TN=probs_TN,
            logits_TN=logits_TN,
            null_idx_TK=null_idx_TK,
            null_weight_TK=null_weight_TK,
            null_kind=self.null_kind,
        )

    def update_budget(self, true_experts_per_token: float) -> None:
        """After an optimizer step: one PI step toward target_true_experts with the step's measured mean, the bias
        held where it can still change a selection (budget.null_bias_limits, anti-windup)."""
        if self.null_bias is not None:
            lo, hi = null_bias_limits(self.expert_bias, self.null_expert_bias)
            update_null_bias(self.null_bias, self.null_bias_integral, true_experts_per_token,
                             self.target_true_experts, self.budget_kp, self.budget_ki, lo, hi)

    # ------------------------------------------------------------------------------------------------------
    # facts (routing/base.py)

    @classmethod
    def validate_config(cls, e: MoEConfig, p: str) -> None:
        super().validate_config(e, p)
        if e.target_true_experts is not None:
            # k picks over n true + m null experts: a token uses between max(0, k - m) and min(k, n) true experts;
            # a target outside that range can never be met and the controller would only saturate.
            lo, hi = max(0, e.top_k - e.num_null_experts), min(e.top_k, e.num_experts)
            if not (math.isfinite(e.target_true_experts) and lo <= e.target_true_experts <= hi):
                config_fail(f"{p}.target_true_experts", e.target_true_experts,
                            f"must be in [{lo}, {hi}] = [max(0, top_k - num_null_experts), min(top_k, num_experts)] "
                            f"(top_k={e.top_k} picks over {e.num_experts} true + {e.num_null_experts} null experts)")

    @classmethod
    def validate_unread(cls, e: MoEConfig, p: str) -> None:
        if e.top_p_renormalize:
            config_fail(f"{p}.top_p_renormalize", e.top_p_renormalize, f"only router: top_p reads it (router is "
                        f"{e.router!r}); other routers renormalise with norm_topk_prob")

    @classmethod
    def experts_word(cls) -> str:
        return "true + null experts"

    @classmethod
    def kernel_excluded(cls, e: MoEConfig) -> str:
        if group_limited(e):
            return f"topk_method {e.topk_method!r} (group-limited selection)"
        if e.null_kind != "zero":
            return f"null_kind {e.null_kind!r} (null picks that return a value)"
        if e.null_tie_break != "true_first":
            return f"null_tie_break {e.null_tie_break!r} (torch.topk's tie order)"
        return ""

    @classmethod
    def capacity_drops_to_null(cls, e: MoEConfig) -> bool:
        # identity / constant null picks carry weight: a dropped pick then just loses its term, nothing renormalised
        return e.null_kind == "zero"

    @classmethod
    def hf_remote_reason(cls, e: MoEConfig) -> Optional[str]:
        return f"{e.num_null_experts} null experts of kind {e.null_kind!r}"

    @classmethod
    def megatron_reason(cls, e: MoEConfig) -> Optional[str]:
        if e.num_null_experts < 1:
            return (f"null experts need num_null_experts >= 1, got {e.num_null_experts}; use method='topk' for "
                    f"plain top-k")
        return None

    @classmethod
    def hf_top_k(cls, e: MoEConfig) -> int:
        return e.resolved_baseline_top_k  # transformers' family router runs the true experts only (io/hf_config.py)

    @classmethod
    def gate_flops_per_token(cls, e: MoEConfig, D: int, extras: bool = True) -> float:
        return 2 * D * e.num_experts + (2 * D * e.num_null_experts if extras else 0)

    @classmethod
    def describe(cls, e: MoEConfig) -> str:
        return f"{e.num_experts} true + {e.num_null_experts} null experts, k {e.top_k}"

    @classmethod
    def baseline_k(cls, e: MoEConfig) -> Optional[int]:
        return e.resolved_baseline_top_k

    @classmethod
    def adak_base_reason(cls, e: MoEConfig) -> str:
        # identity / constant null experts (LongCat-Flash's zero-computation experts): Ada-K keeps the ranking over
        # true + null experts; AdaMoE's zero ones are not converted
        return "" if e.null_kind != "zero" else \
            f"its router is {e.router!r} with {e.num_null_experts} {e.null_kind!r} null experts (AdaMoE's, not converted)"

    def gate_weights(self) -> list[torch.Tensor]:
        return [self.gate.weight] + ([self.null_gate.weight] if self.null_gate is not None else [])

    def plan_shape(self) -> tuple[int, int]:
        return self.num_experts + self.num_null, self.top_k

    def _saved_ids(self, K: int, Z: int) -> int:
        return K if self.null_kind == "zero" else 2 * K  # split_null_slots: new ids (and null ids)

    def _fixed_bytes(self, D: int, c: float) -> float:
        Z, _ = self.plan_shape()
        return Z * D * c if self.null_gate is not None else 0  # torch.cat of the two gates, saved by F.linear

    def _null_gate_bytes(self, K: int) -> float:
        return 4 * K if self.null_kind != "zero" else 0
