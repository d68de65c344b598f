"""Balancing terms: the one implementation every path calls.

Callers: the routers of moe_train.routing (local batch), parallel/parallelize.py's global aux-loss hook (counts
summed over all ranks) and the Megatron router (parallel/megatron/router.py: counts summed over tp x cp, a padding
mask, Megatron's loss scaling). Each caller chooses the group its counts are reduced over and passes the reduced
counts in, as Megatron's switch_load_balancing_loss_func takes ``tokens_per_expert`` and ``total_num_tokens``;
these functions never communicate.
Shape legend (docs/shapes.md, with its exceptions for N and L):
T tokens (this rank's), N scored experts (n true + m null), E true experts.
"""

from __future__ import annotations

from typing import Optional

import torch


def load_balancing_loss(probs_TN: torch.Tensor, counts_N: torch.Tensor, *,
                        num_tokens: Optional[torch.Tensor] = None, padding_mask_T: Optional[torch.Tensor] = None,
                        num_null: int = 0) -> torch.Tensor:
    """Switch-style auxiliary loss, normalised by the actual number of selections, null buckets averaged.

        f_i = c~_i / sum_j c~_j,   P_i = (sum_{valid t} p_{t,i}) / num_tokens,   L = N * sum_i f_i P_i

    probs_TN:       this rank's router probabilities over the N scored experts (the n true, then the m null).
    counts_N:       selections of each scored expert, already summed over whatever group the caller chose (the
                    local batch, all ranks, Megatron's tp x cp group). With m null experts only their TOTAL
                    matters: AdaMoE averages the m null counts into one shared bucket, c~_j = (1/m) sum_{null l} c_l
                    for every null j, so the loss steers only the total null usage (AdaMoE, arXiv 2406.13233); a
                    caller that knows only the null total may spread it evenly over the m entries.
    num_tokens:     what the probability sum is divided by: the valid tokens of the group the counts cover when
                    the probabilities are a shard of that group's (Megatron: tp x cp). None: the mean over this
                    rank's valid tokens.
    padding_mask_T: True = padding: such tokens stay out of P (the caller also leaves them out of the counts).
    num_null:       m, the null bucket's size (the last m of N).

    f divides by the real number of selections (sum_j c_j, not T*k), so the term stays correct when k varies per
    token; with k fixed, m = 0 and no padding it is Megatron's switch_load_balancing_loss_func. Returns 0 when
    nothing was selected.
    """
    N = probs_TN.shape[-1]
    c = counts_N.to(probs_TN.dtype)
    if num_null > 0:
        null_mean = c[N - num_null:].mean()
        c = torch.cat([c[: N - num_null], null_mean.expand(num_null)])
    total = c.sum().clamp_min(1.0)
    f = c / total
    if padding_mask_T is not None:
        valid_T = ~padding_mask_T.to(torch.bool)
        probs_TN = probs_TN * valid_T[:, None]
        if num_tokens is None:
            num_tokens = valid_T.sum()
    if num_tokens is not None:  # a sum over the group's tokens
        P = probs_TN.sum(dim=0) / num_tokens.to(probs_TN.dtype).clamp_min(1.0)
    else:  # the local mean (the routers' own term): this exact operation order is the native path's
        P = probs_TN.mean(dim=0) if probs_TN.shape[0] > 0 else torch.zeros_like(f)
    return N * (f * P).sum()


def null_bucket_counts(counts_E: torch.Tensor, null_total: torch.Tensor, num_null: int) -> torch.Tensor:
    """counts_N for load_balancing_loss from the true counts and the TOTAL null picks, spread evenly over the m
    null entries (exact: the loss reads only their mean). For callers that never see the individual null picks
    (the global aux-loss hook, the Megatron router: a plan keeps null slots as -1)."""
    if num_null == 0:
        return counts_E
    return torch.cat([counts_E, (null_total / num_null).expand(num_null)])


def router_z_loss(logits_TN: torch.Tensor, padding_mask_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over the valid tokens of (logsumexp_i z_{t,i})^2, over all scored experts
    (null included), in fp32. padding_mask_T: True = padding, left out of the mean (Megatron's padding_mask)."""
    if logits_TN.shape[0] == 0:
        return logits_TN.new_zeros((), dtype=torch.float32)
    lse2_T = torch.logsumexp(logits_TN.float(), dim=-1).square()
    if padding_mask_T is None:
        return lse2_T.mean()
    valid_T = ~padding_mask_T.to(torch.bool)
    return (lse2_T * valid_T).sum() / valid_T.sum().float().clamp_min(1.0)


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load), in place.

    The bias is added to the scores for SELECTION only; gate weights come from the unbiased probabilities.
    """
    load = counts_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))
