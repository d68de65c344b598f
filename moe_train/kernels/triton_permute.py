"""Triton kernels for token permutation with -1 (null / unused) slots, and their autograd wrappers.

Three jobs, each a kernel plus a plain-torch reference in moe_train.kernels.permute:
  build     per-block expert histograms -> (torch cumsum on device) block bases -> destination row of every true
            slot. Stable: within an expert, rows follow ascending flat slot id (t*K + k), exactly the order of the
            reference's stable argsort. The only host sync reads the number of true rows (to size slot_N) and the
            number of out-of-range ids (to raise) in one transfer.
  scatter   token-major: each token reads its row ONCE and writes it to each of its true slots' rows (optionally
            times the slot weight). Forward of permute; backward of unpermute_combine (grad rows = grad * weight,
            fused with grad weight = rowwise dot(grad, row)).
  combine   token-major gather-sum: out[t] = sum over t's true slots of (weight *) rows[row of slot], 0 for a token
            without true slots. Forward of unpermute_combine; backward of permute (no weights). No atomics, so the
            results are deterministic.
Null slots are never read, written or multiplied: rows are indexed through row_TK, and -1 rows are masked off.

Triton reads TRITON_INTERPRET when a kernel is DEFINED (``@triton.jit`` at import of this module): to run these
kernels on CPU tensors, set TRITON_INTERPRET=1 before this module is first imported (tests import a fresh copy).
Shape legend: T tokens, K slots per token, M = T*K flat slots, D hidden, E experts, N true rows, Bk blocks of slots.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# Whether the kernels below were defined for the CPU interpreter (decided by triton at decoration time).
INTERPRETED = bool(triton.knobs.runtime.interpret)

BUILD_BLOCK = 256  # slots per program in the build kernels
EXPERT_CHUNK = 32  # experts compared at once: a [BUILD_BLOCK, EXPERT_CHUNK] tile, at most
MAX_BLOCK_D = 1024  # hidden elements per inner iteration of the row kernels, at most
ROW_TILE = 4096  # elements of the row kernels' [BLOCK_K, BLOCK_D] tile, at most: 32 per thread on 4 warps


# Launch parameters, one function per kernel family: the wrappers below launch with exactly these values and
# moe_train.kernels.aot_report compiles what the wrappers launch (tests/test_kernels_aot.py: zero ptxas spills on
# sm_90 and sm_100 at E up to 768, K up to 12, D up to 7168, bf16 and fp32).


def build_config(E: int) -> dict:
    """_block_histogram_kernel / _destination_kernel: BLOCK slots per program, EB experts per comparison chunk.
    The destination kernel's cumsum keeps int32 [BLOCK, EB] tiles (64 elements per thread at 256 x 32: 167
    registers on sm_90, no spills); fewer experts than a chunk shrink the chunk instead of comparing padding."""
    return dict(BLOCK=BUILD_BLOCK, EB=min(EXPERT_CHUNK, max(8, triton.next_power_of_2(E))), num_warps=4)


def row_config(K: int, D: int) -> dict:
    """_scatter_kernel / _combine_kernel: BLOCK_K >= K slots by BLOCK_D hidden elements per inner iteration. The
    [BLOCK_K, BLOCK_D] tile holds values and int64 addresses; at 16 x 1024 (K = 12) it took 146-255 registers on
    sm_90 and a K = 8 tile spilled on sm_100, so the tile is capped at ROW_TILE elements: wide rows for few slots
    per token, narrower ones for many (still >= 256 contiguous elements per row: whole 128-byte lines)."""
    block_k = triton.next_power_of_2(max(K, 1))
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D, max(ROW_TILE // block_k, 16))
    return dict(BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)


# ----------------------------------------------------------------------------------------------------------------
# build_permutation
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _block_histogram_kernel(idx_ptr, hist_ptr, bad_ptr, M, E, BLOCK: tl.constexpr, EB: tl.constexpr):
    """hist[b, e] = number of slots of block b routed to expert e; bad[b] = ids outside [-1, E)."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < M
    e = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    bad = in_range & ((e < -1) | (e >= E))
    tl.store(bad_ptr + b, tl.sum(bad.to(tl.int32), axis=0))
    # int32 ids for the [BLOCK, EB] comparisons (an int64 tile doubles their registers); bad ids match no expert.
    e = tl.where(bad, -1, e).to(tl.int32)
    for c in range(0, tl.cdiv(E, EB)):
        ex = c * EB + tl.arange(0, EB)
        hit = e[:, None] == ex[None, :]
        tl.store(hist_ptr + b.to(tl.int64) * E + ex, tl.sum(hit.to(tl.int32), axis=0), mask=ex < E)


@triton.jit
def _destination_kernel(idx_ptr, base_ptr, row_ptr, slot_ptr, token_ptr, M, E, K,
                        BLOCK: tl.constexpr, EB: tl.constexpr):
    """row of slot s = base[block, e] + (number of earlier slots of the block with the same expert e)."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < M
    e = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    true_slot = in_range & (e >= 0) & (e < E)  # ids out of range (only when the caller skipped the check): no row
    e = tl.where(true_slot, e, -1).to(tl.int32)
    # Rank of each slot among the block's slots of its expert, chunk by chunk of EB experts. Only int32 [BLOCK, EB]
    # tiles live in the loop; the base row is gathered once per slot after it (its int64 tile spilled before).
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(0, tl.cdiv(E, EB)):
        ex = c * EB + tl.arange(0, EB)
        hit = e[:, None] == ex[None, :]
        incl = tl.cumsum(hit.to(tl.int32), axis=0)  # inclusive count of same-expert slots up to this one
        rank += tl.sum(tl.where(hit, incl, 0), axis=1)
    base = tl.load(base_ptr + b.to(tl.int64) * E + e, mask=true_slot, other=0)
    row = base + (rank - 1)
    tl.store(row_ptr + offs, tl.where(true_slot, row, -1), mask=in_range)
    slot = offs.to(tl.int64)
    tl.store(slot_ptr + row, slot, mask=true_slot)
    tl.store(token_ptr + row, slot // K, mask=true_slot)


def build_rows(expert_idx_TK: torch.Tensor, num_experts: int, block: Optional[int] = None,
               expert_chunk: Optional[int] = None, num_rows: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (slot_N, token_N, counts_E, row_TK), all int64 on the input's device. ``num_rows`` (known to the
    caller): no host sync and no id check. ``block`` / ``expert_chunk``: instead of build_config's (tests)."""
    T, K = expert_idx_TK.shape
    M, E = T * K, num_experts
    dev = expert_idx_TK.device
    idx_M = expert_idx_TK.reshape(-1).contiguous()
    if M == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.zeros(E, dtype=torch.int64, device=dev), empty.reshape(T, K)
    cfg = build_config(E)
    cfg.update({k: v for k, v in (("BLOCK", block), ("EB", expert_chunk)) if v is not None})
    nb = triton.cdiv(M, cfg["BLOCK"])
    hist_BkE = torch.empty(nb, E, dtype=torch.int32, device=dev)
    bad_Bk = torch.empty(nb, dtype=torch.int32, device=dev)
    _block_histogram_kernel[(nb,)](idx_M, hist_BkE, bad_Bk, M, E, **cfg)
    hist_BkE = hist_BkE.to(torch.int64)
    counts_E = hist_BkE.sum(0)
    # Base row of (block b, expert e): rows of all earlier experts + rows of expert e in earlier blocks.
    start_E = torch.cumsum(counts_E, 0) - counts_E
    base_BkE = (start_E[None, :] + torch.cumsum(hist_BkE, 0) - hist_BkE).contiguous()
    if num_rows is not None:
        num_true, num_bad = num_rows, 0
    else:
        num_true, num_bad = torch.stack([counts_E.sum(), bad_Bk.sum().to(torch.int64)]).tolist()  # the one host sync
    if num_bad:
        raise ValueError(f"expert_idx holds {num_bad} ids outside [-1, {E}) (num_experts={E}); "
                         "valid ids are 0..num_experts-1, and -1 for null / unused slots")
    row_M = torch.empty(M, dtype=torch.int64, device=dev)
    slot_N = torch.empty(num_true, dtype=torch.int64, device=dev)
    token_N = torch.empty(num_true, dtype=torch.int64, device=dev)
    _destination_kernel[(nb,)](idx_M, base_BkE, row_M, slot_N, token_N, M, E, K, **cfg)
    return slot_N, token_N, counts_E, row_M.reshape(T, K)


# ----------------------------------------------------------------------------------------------------------------
# row movement: scatter (token -> its rows) and combine (rows -> token)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _scatter_kernel(src_ptr, row_ptr, w_ptr, dst_ptr, y_ptr, gw_ptr, D, K,
                    HAS_W: tl.constexpr, WRITE_ROWS: tl.constexpr, WANT_GW: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[row[t,k]] = src[t] (* w[t,k]) for true slots; optionally gw[t,k] = dot(src[t], y[row[t,k]])."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rows = tl.load(row_ptr + t * K + ks, mask=ks < K, other=-1)
    true_k = rows >= 0
    n_true = tl.sum(true_k.to(tl.int32), axis=0)  # an all-null token reads nothing
    if HAS_W:
        w = tl.load(w_ptr + t * K + ks, mask=true_k, other=0.0).to(ACC)
    gw = tl.zeros([BLOCK_K], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        x = tl.load(src_ptr + t * D + d, mask=in_d & (n_true + tl.zeros_like(d) > 0), other=0.0).to(ACC)
        mask_KD = true_k[:, None] & in_d[None, :]
        ptr_KD = rows[:, None] * D + d[None, :]
        if WRITE_ROWS:
            if HAS_W:
                vals = x[None, :] * w[:, None]
            else:
                vals = tl.broadcast_to(x[None, :], (BLOCK_K, BLOCK_D))
            tl.store(dst_ptr + ptr_KD, vals.to(dst_ptr.dtype.element_ty), mask=mask_KD)
        if WANT_GW:
            y = tl.load(y_ptr + ptr_KD, mask=mask_KD, other=0.0).to(ACC)
            gw += tl.sum(y * x[None, :], axis=1)
    if WANT_GW:
        tl.store(gw_ptr + t * K + ks, gw.to(gw_ptr.dtype.element_ty), mask=ks < K)


@triton.jit
def _combine_kernel(src_ptr, row_ptr, w_ptr, out_ptr, D, K,
                    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum over true slots k of (w[t,k] *) src[row[t,k]]; 0 for a token without true slots."""
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rows = tl.load(row_ptr + t * K + ks, mask=ks < K, other=-1)
    true_k = rows >= 0
    if HAS_W:
        w = tl.load(w_ptr + t * K + ks, mask=true_k, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < D
        v = tl.load(src_ptr + rows[:, None] * D + d[None, :], mask=true_k[:, None] & in_d[None, :], other=0.0)
        v = v.to(ACC)
        if HAS_W:
            v = v * w[:, None]
        tl.store(out_ptr + t * D + d, tl.sum(v, axis=0).to(out_ptr.dtype.element_ty), mask=in_d)


def _acc_dtype(dtype: torch.dtype):
    # fp32 accumulation for fp32/bf16/fp16 rows; fp64 rows (tests) keep fp64.
    return tl.float64 if dtype == torch.float64 else tl.float32


def scatter_rows(src_TD: torch.Tensor, row_TK: torch.Tensor, num_rows: int, weight_TK: torch.Tensor | None = None,
                 y_ND: torch.Tensor | None = None, write_rows: bool = True
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dst_ND, grad_weight_TK): dst_ND[row[t,k]] = src_TD[t] (* weight[t,k]); grad_weight = dot(src[t], y[row])
    when y_ND is given (0 on null slots). Every one of the num_rows rows is written exactly once."""
    T, K = row_TK.shape
    D = src_TD.shape[1]
    dst = torch.empty(num_rows, D, dtype=src_TD.dtype, device=src_TD.device) if write_rows else None
    gw = torch.zeros(T, K, dtype=weight_TK.dtype, device=src_TD.device) if y_ND is not None else None
    if T == 0 or num_rows == 0 or D == 0:
        return dst, gw
    src_TD = src_TD.contiguous()
    dummy = src_TD  # never dereferenced: the constexpr flags compile those loads/stores out
    _scatter_kernel[(T,)](
        src_TD, row_TK, weight_TK.contiguous() if weight_TK is not None else dummy,
        dst if write_rows else dummy, y_ND.contiguous() if y_ND is not None else dummy,
        gw if gw is not None else dummy, D, K,
        HAS_W=weight_TK is not None, WRITE_ROWS=write_rows, WANT_GW=y_ND is not None,
        ACC=_acc_dtype(src_TD.dtype), **row_config(K, D))
    return dst, gw


def combine_rows(src_ND: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor | None = None) -> torch.Tensor:
    """out_TD[t] = sum over t's true slots of (weight *) src_ND[row]; zeros for tokens without true slots."""
    T, K = row_TK.shape
    D = src_ND.shape[1]
    if T == 0 or D == 0 or src_ND.shape[0] == 0:
        return src_ND.new_zeros(T, D)
    out = torch.empty(T, D, dtype=src_ND.dtype, device=src_ND.device)
    src_ND = src_ND.contiguous()
    _combine_kernel[(T,)](
        src_ND, row_TK, weight_TK.contiguous() if weight_TK is not None else src_ND, out, D, K,
        HAS_W=weight_TK is not None, ACC=_acc_dtype(src_ND.dtype), **row_config(K, D))
    return out


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


class PermuteFn(torch.autograd.Function):
    """x_ND[row[t,k]] = x_TD[t]; backward: grad_x[t] = sum of grad rows of t's true slots (a combine)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, row_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(row_TK)
        return scatter_rows(x_TD, row_TK, num_rows)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: torch.Tensor):
        (row_TK,) = ctx.saved_tensors
        return combine_rows(grad_ND, row_TK), None, None


class UnpermuteCombineFn(torch.autograd.Function):
    """out_TD[t] = sum_k w[t,k] y_ND[row[t,k]]; backward: grad_y[row] = w * grad_out[t], grad_w = dot(grad_out, y)."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_ND, weight_TK, row_TK)
        return combine_rows(y_ND, row_TK, weight_TK)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: torch.Tensor):
        y_ND, weight_TK, row_TK = ctx.saved_tensors
        want_gy, want_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y, grad_w = scatter_rows(grad_TD, row_TK, y_ND.shape[0], weight_TK,
                                      y_ND=y_ND if want_gw else None, write_rows=want_gy)
        return grad_y, grad_w, None


def permute(x_TD: torch.Tensor, row_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    return PermuteFn.apply(x_TD, row_TK, num_rows)


def unpermute_combine(y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    return UnpermuteCombineFn.apply(y_ND, weight_TK, row_TK)
