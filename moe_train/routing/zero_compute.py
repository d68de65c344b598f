"""Zero-computation (null) expert kinds: what a picked null expert returns, and where that is computed.

One kind per model (``model.moe.null_kind``, NULL_KINDS below; docs/zero_compute.md):

    zero      E_j(x) = 0          AdaMoE (arXiv 2406.13233); MoE++'s zero expert
    identity  E_j(x) = x          LongCat-Flash's zero-computation experts; MoE++'s copy expert
    constant  E_j(x) = v_j        MoE++'s constant expert (simplified: MoE++ mixes x and v_j with a second gate),
                                  v_j a learned vector per null expert, v [Z, D]

    y_t = sum_{true picks i} w_ti E_i(x_t)  +  sum_{null picks j} w_tj E_j(x_t)

Gates (``split_null_slots``). ``zero``: the null weights are discarded and, with norm_topk_prob, the TRUE picks are
renormalised among themselves (AdaMoE). ``identity`` / ``constant``: every pick contributes, so every pick's
weight is a real gate weight: with norm_topk_prob all k picks (true and null) are normalised together, without it
all keep their raw probabilities (LongCat-Flash). A routed scaling factor, where a family has one, scales both.

Where (``null_expert_output``). The null term is computed on the token's own rank after the dispatcher's combine,
by this one function for every path (model/moe_layer.py for the local and all-to-all dispatchers,
parallel/megatron/zero_compute.py for Megatron's layer). In the routing plan a null slot keeps expert_idx_TK = -1
and weight_TK = 0, so no dispatcher ever permutes, sends or multiplies a row for it; the null picks travel in
``plan.null_idx_TK`` / ``plan.null_weight_TK``. Cost per token: identity D multiply-adds (the token's null weights
are summed first); constant one [1, Z] x [Z, D] product (2*Z*D FLOPs; the dense form of the gather of <= K rows,
a GEMM instead of a [T, K, D] gather).
Shape legend (docs/shapes.md): T tokens, K slots, D hidden, E true experts, Z null experts.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_train.kernels.routing import renormalize

# What a picked null (zero-computation) expert returns, one kind per model: the one list (config.py types
# model.moe.null_kind with it):
#   zero:     0 (AdaMoE); gates renormalised over the TRUE picks only (norm_topk_prob)
#   identity: gate * x (LongCat-Flash zero-computation experts, MoE++ copy experts)
#   constant: gate * v_j, a learned vector per null expert j (MoE++ constant experts)
# identity / constant gates are real gate weights: with norm_topk_prob they normalise over ALL k picks.
NULL_KINDS = ("zero", "identity", "constant")


def split_null_slots(weight_TK: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, kind: str,
                     norm_topk_prob: bool):
    """The router's k picks over E true + Z null experts (idx in [0, E + Z), weights = their probabilities) ->
    (expert_idx_TK, weight_TK, null_idx_TK, null_weight_TK) under ``kind``'s gate rule (module docstring).

    expert_idx_TK: the true expert of each slot, -1 on null slots; weight_TK: 0 on null slots.
    null_idx_TK: the null expert (0..Z-1) of each null slot, -1 on true slots; null_weight_TK: 0 on true slots.
    ``zero`` returns None for both null tensors (nothing to combine)."""
    assert kind in NULL_KINDS, kind  # config.py types null_kind with NULL_KINDS
    true_TK = idx_TK < num_experts
    expert_idx_TK = torch.where(true_TK, idx_TK, torch.full_like(idx_TK, -1))
    if kind == "zero":
        weight_TK = renormalize(weight_TK, true_TK) if norm_topk_prob else weight_TK * true_TK
        return expert_idx_TK, weight_TK, None, None
    if norm_topk_prob:  # every pick contributes: normalise over all of them
        weight_TK = renormalize(weight_TK, torch.ones_like(true_TK))
    null_idx_TK = torch.where(true_TK, torch.full_like(idx_TK, -1), idx_TK - num_experts)
    return expert_idx_TK, weight_TK * true_TK, null_idx_TK, weight_TK * ~true_TK


def null_expert_output(x_TD: torch.Tensor, null_idx_TK: torch.Tensor, null_weight_TK: torch.Tensor, kind: str,
                       null_values_ZD: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum over t's null slots s of null_weight[s] * E_null(x_t), [T, D] in x's dtype (the module docstring).
    Gate weights are cast to the computing dtype, as the true experts' combine does."""
    if kind == "identity":
        s_T = null_weight_TK.sum(dim=-1)
        return x_TD * s_T.to(x_TD.dtype)[:, None]
    if kind == "constant":
        if null_values_ZD is None:
            raise ValueError("null_kind 'constant' needs the null experts' vectors (router.null_values [Z, D])")
        T, Z = x_TD.shape[0], null_values_ZD.shape[0]
        # null_weight is 0 on true slots, so their (clamped) index adds 0
        w_TZ = null_weight_TK.new_zeros(T, Z).scatter_add(1, null_idx_TK.clamp(min=0), null_weight_TK)
        return (w_TZ.to(null_values_ZD.dtype) @ null_values_ZD).to(x_TD.dtype)
    raise ValueError(f"null_expert_output: kind {kind!r} returns something only for 'identity' / 'constant' "
                     f"(of {NULL_KINDS})")


def add_null_output(y_TD: torch.Tensor, x_TD: torch.Tensor, plan, null_values_ZD: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """y_TD (the dispatcher's combine of the true slots) + the plan's null term; y_TD itself when the plan's kind
    returns nothing (``zero``, or a router without null experts)."""
    if plan.null_weight_TK is None:
        return y_TD
    return y_TD + null_expert_output(x_TD, plan.null_idx_TK, plan.null_weight_TK, plan.null_kind,
                                     null_values_ZD).to(y_TD.dtype)
