"""Sort-free permutation build and gather-based permute / combine: the torch path of moe_train.kernels.permute.

build (counting pass, no sort)
    counts_E = bincount(expert of every true slot)
    rank of slot s within its expert = number of earlier slots with the same expert (a cumsum over a one-hot
    [E, M] tile: a counting pass, the same one the Triton build kernel runs per block)
    row of slot s = rows of all earlier experts + its rank      -> exactly the order of a stable argsort by expert
  The one-hot tile costs E x M; above COUNTING_MAX_EXPERTS the stable argsort is cheaper on CPU and gives the same
  rows (both are tested against a pure-python stable sort), so the build takes the sort there.

gather form of the rows of each token (built once per permutation, ``gather_index``):
    slots_Ns   the true slots in ascending flat slot id t*K + k (slot order: token-major), N entries
    rows_Ns    their grouped rows (row_TK at those slots)
    offsets_T first position of each token's true slots in that list (a token without true slots: an empty bag)

combine   out_TD[t] = sum over t's true slots, in slot order, of w[slot] * y_ND[row]: ONE fused gather + weighted
          sum per token (torch.embedding_bag, mode sum, per-sample weights; fp32 accumulation for bf16 rows), no
          index_add_ / scatter_add_: each output row is written once, so the result is deterministic.
          backward: every row belongs to exactly one slot, so grad_y_ND[row] = w[slot] * grad_out[token] is a gather
          (index_select by token_N, scaled in place) and grad_w[slot] = dot(grad_out[token], y_ND[row]) a row-wise
          dot written to its own slot (index_copy_ of distinct positions). Null slots get weight gradient 0.
permute   x_ND = x_TD[token_N] (index_select); backward grad_x[t] = sum of t's row gradients: the same gather-sum
          without weights (embedding_bag), instead of index_select's index_add_ backward.
Null slots are never read: only the N true slots appear in rows_Ns. Both Functions are once-differentiable.
Shape legend (docs/shapes.md): T tokens, K slots per token, M = T*K flat slots, D hidden, E experts,
N true rows (grouped by expert), Ns the same N true slots in slot order (token-major).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# The counting pass builds an [E, M] one-hot tile; measured on a 2-core AVX2 CPU (docs/kernels.md) it matches the
# stable argsort at E = 8 and falls behind above a few dozen experts, so larger E takes the sort (same rows).
COUNTING_MAX_EXPERTS = 32

_SCRATCH = threading.local()  # per thread: autograd may run a backward on another thread (CUDA device threads)


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused 1-D buffer of at least numel elements for a temporary consumed inside one call (never returned).
    On CPU every fresh large buffer pays first-touch page faults (the allocator hands big blocks back to the OS)."""
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    key = (dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def counting_rows(flat_M: torch.Tensor, key_M: torch.Tensor, counts_E: torch.Tensor, num_experts: int) -> torch.Tensor:
    """row_M: grouped row of every flat slot (-1 on null slots), by a counting pass (no sort).
    key_M: expert of each slot with null slots mapped to num_experts; counts_E: true rows per expert."""
    E = num_experts
    if E == 0 or flat_M.numel() == 0:
        return torch.full_like(flat_M, -1)
    experts = torch.arange(E, device=flat_M.device, dtype=key_M.dtype)
    hit_EM = (experts[:, None] == key_M[None, :]).to(torch.int32)
    rank_EM = hit_EM.cumsum_(1)  # inclusive count of same-expert slots up to each slot, along contiguous memory
    start_E = torch.cumsum(counts_E, 0) - counts_E
    true_M = flat_M >= 0
    e_M = key_M.clamp(max=E - 1)  # null slots read expert E-1's column; masked below
    rank_M = rank_EM.gather(0, e_M[None, :]).squeeze(0).to(torch.int64) - 1
    return torch.where(true_M, start_E[e_M] + rank_M, torch.full_like(flat_M, -1))


def build_rows_torch(expert_idx_TK: torch.Tensor, num_experts: int, num_true: int, counts_key: torch.Tensor,
                     key_M: torch.Tensor):
    """(slot_N, token_N, row_TK, slots_Ns, rows_Ns, offsets_T) for ids already checked; counts_key = bincount of key_M
    (E + 1 buckets, the last one null)."""
    T, K = expert_idx_TK.shape
    flat = expert_idx_TK.reshape(-1)
    dev = flat.device
    if num_experts <= COUNTING_MAX_EXPERTS:
        row_M = counting_rows(flat, key_M, counts_key[:num_experts], num_experts)
    else:  # the same rows by a stable sort (cheaper than an E x M tile for many experts)
        order = torch.argsort(key_M, stable=True)[:num_true]
        row_M = torch.full_like(flat, -1, dtype=torch.int64)
        row_M[order] = torch.arange(num_true, device=dev)
    slots_Ns = torch.nonzero_static(flat >= 0, size=num_true).squeeze(1)  # slot order; no sync: size is known
    rows_Ns = row_M.index_select(0, slots_Ns)
    slot_N = torch.empty(num_true, dtype=torch.int64, device=dev).index_copy_(0, rows_Ns, slots_Ns)  # distinct rows
    n_true_T = (expert_idx_TK >= 0).sum(1)
    offsets_T = torch.cumsum(n_true_T, 0) - n_true_T
    return (slot_N, torch.div(slot_N, K, rounding_mode="floor"), row_M.reshape(T, K), slots_Ns, rows_Ns, offsets_T)


def gather_index_from_rows(row_TK: torch.Tensor, num_rows: int):
    """(slots_Ns, rows_Ns, offsets_T) from row_TK alone (for a permutation built by the Triton kernels)."""
    flat = row_TK.reshape(-1)
    slots_Ns = torch.nonzero_static(flat >= 0, size=num_rows).squeeze(1)
    n_true_T = (row_TK >= 0).sum(1)
    return slots_Ns, flat.index_select(0, slots_Ns), torch.cumsum(n_true_T, 0) - n_true_T


def _gather_sum(src_ND: torch.Tensor, rows_Ns: torch.Tensor, offsets_T: torch.Tensor,
                w_Ns: Optional[torch.Tensor]) -> torch.Tensor:
    """out_TD[t] = sum over t's entries s of (w_Ns[s] *) src_ND[rows_Ns[s]]; zeros for an empty token."""
    T, D = offsets_T.shape[0], src_ND.shape[1]
    if src_ND.shape[0] == 0 or T == 0 or D == 0:
        return src_ND.new_zeros(T, D)
    return F.embedding_bag(rows_Ns, src_ND.contiguous(), offsets_T, mode="sum", per_sample_weights=w_Ns)


class GatherPermuteFn(torch.autograd.Function):
    """x_ND = x_TD[token_N]; backward: grad_x[t] = sum of t's row gradients (gather-sum, no index_add_)."""

    @staticmethod
    def forward(ctx, x_TD, token_N, rows_Ns, offsets_T):
        ctx.save_for_backward(rows_Ns, offsets_T)
        return x_TD.index_select(0, token_N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        rows_Ns, offsets_T = ctx.saved_tensors
        return _gather_sum(grad_ND, rows_Ns, offsets_T, None), None, None, None


class GatherCombineFn(torch.autograd.Function):
    """out_TD[t] = sum_s w[slot s] y_ND[row s]; backward by gathers and row-wise dots (module docstring)."""

    @staticmethod
    def forward(ctx, y_ND, weight_TK, token_N, slot_N, slots_Ns, rows_Ns, offsets_T):
        w_flat = weight_TK.reshape(-1).to(y_ND.dtype)
        ctx.save_for_backward(y_ND, w_flat, token_N, slot_N)
        ctx.weight_shape, ctx.weight_dtype = weight_TK.shape, weight_TK.dtype
        return _gather_sum(y_ND, rows_Ns, offsets_T, w_flat.index_select(0, slots_Ns))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        y_ND, w_flat, token_N, slot_N = ctx.saved_tensors
        want_gy, want_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, D = y_ND.shape
        g_ND = grad_TD.index_select(0, token_N)  # each row's token gradient: a gather, every row written once
        grad_w = None
        if want_gw:
            prod = torch.mul(g_ND, y_ND, out=scratch(N * D, g_ND.dtype, g_ND.device).view(N, D))
            gw_N = prod.sum(1, dtype=torch.float64 if y_ND.dtype == torch.float64 else torch.float32)
            grad_w = torch.zeros(ctx.weight_shape.numel(), dtype=ctx.weight_dtype, device=y_ND.device)
            grad_w = grad_w.index_copy_(0, slot_N, gw_N.to(ctx.weight_dtype)).view(ctx.weight_shape)  # distinct slots
        grad_y = g_ND.mul_(w_flat.index_select(0, slot_N)[:, None]) if want_gy else None
        return grad_y, grad_w, None, None, None, None, None
