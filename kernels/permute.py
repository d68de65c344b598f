"""Token permutation for a routing plan with -1 (null / unused) slots: plain-torch reference path.

build_permutation groups the TRUE slots by expert; permute gathers their rows; unpermute_combine scatters expert
outputs back to tokens with the slot weights. Null slots are never gathered, so the work and memory of a layer
scale with the number of true assignments N, not with T*K.
The ``backend`` argument is where the Triton kernels (kernels issue) plug in; today only the torch path exists.
Shape legend: T tokens, K slots per token, D hidden, E experts, N true assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """slot_N: flat slot id (t*K + k) of each grouped row; token_N: its token; counts_E: rows per expert."""

    slot_N: torch.Tensor
    token_N: torch.Tensor
    counts_E: torch.Tensor


def build_permutation(expert_idx_TK: torch.Tensor, num_experts: int, backend: str = "auto") -> Permutation:
    """Stable sort of the true slots by expert. One host sync: the number of true rows sizes the output."""
    K = expert_idx_TK.shape[1]
    flat = expert_idx_TK.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat)
    counts = torch.bincount(key, minlength=num_experts + 1)
    num_true = int(counts[:num_experts].sum())
    slot_N = torch.argsort(key, stable=True)[:num_true]
    return Permutation(slot_N=slot_N, token_N=torch.div(slot_N, K, rounding_mode="floor"),
                       counts_E=counts[:num_experts])


def permute(x_TD: torch.Tensor, perm: Permutation, backend: str = "auto") -> torch.Tensor:
    """x_ND[i] = x_TD[token_N[i]] (autograd: index_select backward is an index_add)."""
    return x_TD.index_select(0, perm.token_N)


def unpermute_combine(y_ND: torch.Tensor, perm: Permutation, weight_TK: torch.Tensor, num_tokens: int,
                      backend: str = "auto") -> torch.Tensor:
    """out_TD[t] = sum over t's true slots s of weight[s] * y_ND[row of s]; tokens with no true slot get 0."""
    w_N = weight_TK.reshape(-1).index_select(0, perm.slot_N).to(y_ND.dtype)
    out = y_ND.new_zeros(num_tokens, y_ND.shape[1])
    return out.index_add(0, perm.token_N, y_ND * w_N[:, None])
