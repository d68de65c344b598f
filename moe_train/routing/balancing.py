"""Balancing terms shared by the routers.

Shape legend: T tokens, N scored experts (n true + m null), E true experts.
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs_TN: torch.Tensor, counts_N: torch.Tensor, num_null: int = 0) -> torch.Tensor:
    """Switch-style auxiliary loss, normalised by the actual number of selections, null buckets averaged.

        f_i = c~_i / sum_j c~_j,   P_i = mean_t p_{t,i},   L = N * sum_i f_i P_i

    c_i counts the selections of expert i in the batch. With m null experts (the last m of N), AdaMoE averages
    their counts into one shared bucket, c~_j = (1/m) sum_{null l} c_l for every null j, so the loss steers only
    the TOTAL null usage (REFERENCE.md section 1). Dividing by the real number of selections (not T*k) keeps the
    term correct when k varies per token. Returns 0 when nothing was selected.
    """
    N = probs_TN.shape[-1]
    c = counts_N.to(probs_TN.dtype)
    if num_null > 0:
        null_mean = c[N - num_null:].mean()
        c = torch.cat([c[: N - num_null], null_mean.expand(num_null)])
    total = c.sum().clamp_min(1.0)
    f = c / total
    P = probs_TN.mean(dim=0) if probs_TN.shape[0] > 0 else torch.zeros_like(f)
    return N * (f * P).sum()


def router_z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_t (logsumexp_i z_{t,i})^2, over all scored experts (null included)."""
    if logits_TN.shape[0] == 0:
        return logits_TN.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits_TN.float(), dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load), in place.

    The bias is added to the scores for SELECTION only; gate weights come from the unbiased probabilities.
    """
    load = counts_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))
