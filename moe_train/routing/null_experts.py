"""AdaMoE null experts (arXiv 2406.13233): m zero-cost experts join the n true experts.

    z = [W_g ; W_null] x              (n true logits, then m null logits from a separate linear map, in ONE GEMM)
    p = softmax(z) in fp32,  (w, idx) = topk(p + [b; c], k)     over n + m experts
    (b: optional aux-loss-free expert bias; c: optional compute-budget bias shared by the nulls, budget.py)
    w'_i = w_i / sum_{picked true j} w_j   for true picks (norm_topk_prob), null picks -> slot -1, weight 0
    a token whose picks are all null divides by 1 and outputs 0 (only the residual passes)
    y = sum_{picked true i} w'_i E_i(x)

Ties (``null_tie_break``, config.NULL_TIE_BREAKS). The AdaMoE conversion starts every null gate as an exact copy
of a true gate (W_null = W_g repeated r = m/n times), so each true expert has r null twins of EQUAL score. Both gates
go through one GEMM over their concatenated weights, so a twin's logit comes from the same kernel with the same
reduction over D as its true expert's (bit-identical on CPU in fp32 and bf16, tests/test_routing_fixes.py; CUDA not
yet measured), and the default ``true_first`` ranks a true expert before its twins at equal score
(a stable sort, the same on every device and dtype). At step 0 a token's k picks are then its best true expert,
its r twins, its second true expert, ...: ceil(k / (r + 1)) true experts, the best ones of the original router,
and renormalised over the true picks their gates are the original top-k gates. For Mixtral n=8, m=16, k=4 that is
the original top-2 model, function for function (io/convert.py refuses conversions where it would not be).
``topk`` leaves ties to torch.topk, as the authors' code does (device- and dtype-dependent true experts at step 0).

What a null pick returns is ``null_kind`` (config.NULL_KINDS; routing/zero_compute.py, docs/zero_compute.md): the
above is ``zero`` (AdaMoE); ``identity`` / ``constant`` picks return gate * x / gate * v_j, their gates are real gate
weights (normalised over ALL k picks with norm_topk_prob) and the plan carries them in null_idx_TK / null_weight_TK.

Balancing: load_balancing_loss with the m null counts averaged into one shared bucket, so it steers the total null
usage toward m/(n+m) of the selections (about k*n/(n+m) true experts per token). With m = 0 this router is the
top-k router exactly. With norm_topk_prob=False (Qwen1.5-MoE convention) the true picks keep their raw p.
Shape legend (docs/shapes.md, with its exceptions for N and L):
T tokens, D hidden, E = n true experts, Z = m null experts, N = E + Z, K slots per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import MoEConfig
from moe_train.kernels.routing import route_fused
from moe_train.routing.balancing import load_balancing_loss, router_z_loss, update_expert_bias
from moe_train.routing.budget import null_bias_limits, update_null_bias
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.scores import router_scores, scale_routed, score_distribution, selection_bias
from moe_train.routing.topk import select_topk
from moe_train.routing.zero_compute import split_null_slots


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


class NullExpertRouter(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.num_null = cfg.num_null_experts
        self.top_k = cfg.top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.tie_break = cfg.null_tie_break
        self.expert_bias_rate = cfg.expert_bias_rate
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)
        self.null_gate = nn.Linear(hidden_size, cfg.num_null_experts, bias=False) if cfg.num_null_experts else None
        # What a null pick returns (routing/zero_compute.py); constant: one learned vector per null expert, from 0
        # (the MoE layer's combine reads it; a dense parameter like the gates).
        self.null_kind = cfg.null_kind
        self.null_values = (nn.Parameter(torch.zeros(cfg.num_null_experts, hidden_size))
                            if cfg.null_kind == "constant" else None)
        self.moe_cfg = cfg  # score_func, topk_method / groups, routed_scaling_factor (routing/scores.py)
        has_bias = cfg.expert_bias_rate > 0 or cfg.use_expert_bias
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts) if has_bias else None)
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
        fused = route_fused(logits_TN, c, self.top_k, E, bias_N, self.norm_topk_prob)
        if fused is None:  # the torch path: every convention
            scores_TN = router_scores(logits_TN, c.score_func)
            bias = selection_bias(scores_TN, E, bias_N, c.topk_method, c.n_group, c.topk_group)
            weight_TK, idx_TK = select_topk(scores_TN, self.top_k, bias, self.tie_break)
            expert_idx_TK, weight_TK, null_idx_TK, null_weight_TK = split_null_slots(
                weight_TK, idx_TK, E, self.null_kind, self.norm_topk_prob)
        else:  # null_kind zero (routing_kernel_excluded): null picks output nothing
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

    def update_bias(self, counts_E: torch.Tensor) -> None:
        if self.expert_bias is not None:
            update_expert_bias(self.expert_bias, counts_E, self.expert_bias_rate)

    def update_budget(self, true_experts_per_token: float) -> None:
        """After an optimizer step: one PI step toward target_true_experts with the step's measured mean, the bias
        held where it can still change a selection (budget.null_bias_limits, anti-windup)."""
        if self.null_bias is not None:
            lo, hi = null_bias_limits(self.expert_bias, self.null_expert_bias)
            update_null_bias(self.null_bias, self.null_bias_integral, true_experts_per_token,
                             self.target_true_experts, self.budget_kp, self.budget_ki, lo, hi)
