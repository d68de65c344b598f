"""Router conventions as pure functions every router calls (top-k, null experts, Ada-K; Megatron runs those routers).

    scores   s = softmax(z) over the scored experts (Mixtral, Qwen, DeepSeek-V2)  |  s = sigmoid(z) (DeepSeek-V3)
    choice   c = s + b                  b: selection-only bias (aux-loss-free expert bias, null / budget biases)
    groups   (topk_method != greedy) the E true experts form n_group consecutive groups of E / n_group; a group is
             scored from the TRUE experts' choice scores, by its best one (group_limited_greedy, DeepSeek-V2) or the
             sum of its best two (noaux_tc, DeepSeek-V3); the topk_group best groups stay eligible, the rest get -inf
    pick     the k best by c (routing/topk.py select_topk: exact ties rank the lower index first)
    weights  w = s at the picks (never the bias), renormalised when norm_topk_prob, then times routed_scaling_factor

Null experts under group-limited routing (docs/families.md, "Group-limited routing with null experts"): null
experts never vote for a group, and null expert j (index E + j) is eligible exactly when the group of true expert
j mod E is. So the groups chosen never depend on the null gates, and at AdaMoE conversion (null gate j = true gate
j mod E, its twin) a twin is eligible exactly with its true expert: the conversion stays function-preserving.

Probabilities for balancing and statistics (``plan.probs_TN``): the softmax itself, or for sigmoid the scores
normalised to sum to one per token (as DeepSeek-V3's sequence-wise balance loss does), so the aux loss, the Ada-K
warm start's cumulative probability and the statistics read a distribution under both score functions.
Shape legend: T tokens, E true experts, Z null experts, N = E + Z scored experts, G groups, K slots.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_train.kernels.routing import SCORE_FUNCS  # the one list (the kernel's reference implements both too)

# Expert selection (the one list; config.py types model.moe.topk_method with it): greedy: top-k over all experts |
# group_limited_greedy (DeepSeek-V2): keep the topk_group of n_group expert groups with the largest max score, then
# top-k inside them | noaux_tc (DeepSeek-V3): the same with a group scored by the sum of its two best (bias-corrected)
# scores.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def router_scores(logits_TN: torch.Tensor, score_func: str) -> torch.Tensor:
    """fp32 scores from router logits: softmax over the last dim, or an independent sigmoid per expert."""
    assert score_func in SCORE_FUNCS, score_func  # config.py types score_func with SCORE_FUNCS
    z = logits_TN.float()
    return torch.softmax(z, dim=-1) if score_func == "softmax" else torch.sigmoid(z)


def score_distribution(scores_TN: torch.Tensor, score_func: str) -> torch.Tensor:
    """The per-token distribution behind the scores (module docstring): softmax as is, sigmoid normalised."""
    if score_func == "softmax":
        return scores_TN
    return scores_TN / scores_TN.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def group_scores(choice_TE: torch.Tensor, n_group: int, topk_method: str) -> torch.Tensor:
    """[T, G]: each group's max choice score (group_limited_greedy) or the sum of its two best (noaux_tc)."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.reshape(T, n_group, E // n_group)
    if topk_method == "group_limited_greedy":
        return grouped_TGe.max(dim=-1).values
    assert topk_method == "noaux_tc", topk_method
    return grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)


def group_eligible(choice_TE: torch.Tensor, n_group: int, topk_group: int, topk_method: str) -> torch.Tensor:
    """bool [T, E]: the true experts inside each token's topk_group best groups (exact ties: lower group first)."""
    T, E = choice_TE.shape
    g_TG = group_scores(choice_TE, n_group, topk_method)
    best_TG = torch.sort(g_TG, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep_TG = torch.zeros_like(g_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return keep_TG.repeat_interleave(E // n_group, dim=1)


def selection_bias(scores_TN: torch.Tensor, num_true: int, bias_N: Optional[torch.Tensor], topk_method: str,
                   n_group: int, topk_group: int) -> Optional[torch.Tensor]:
    """The bias select_topk adds to the scores: ``bias_N`` plus -inf where group-limited routing rules an expert out
    ([T, N] then; [N] or None when every expert is eligible). Null experts follow their twin's group (docstring)."""
    assert topk_method in TOPK_METHODS, topk_method
    if topk_method == "greedy" or topk_group >= n_group:
        return bias_N
    E, N = num_true, scores_TN.shape[-1]
    choice_TN = scores_TN if bias_N is None else scores_TN + bias_N
    keep_TE = group_eligible(choice_TN[:, :E], n_group, topk_group, topk_method)
    keep_TN = torch.cat([keep_TE, keep_TE[:, torch.arange(N - E, device=keep_TE.device) % E]], dim=1)
    mask_TN = torch.zeros_like(choice_TN).masked_fill(~keep_TN, float("-inf"))
    return mask_TN if bias_N is None else mask_TN + bias_N


def scale_routed(weight_TK: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    """DeepSeek's routed_scaling_factor on the gate weights (after renormalisation); 1.0 leaves them untouched."""
    return weight_TK if routed_scaling_factor == 1.0 else weight_TK * routed_scaling_factor
