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

from moe_train.kernels.custom_ops import check_same_device, op_name

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
    caller): no host sync and no id check. ``block`` / ``expert_chunk``: instead of build_config's (tests: the
    kernels launched directly); otherwise through the custom op ``moe_train::build_rows``."""
    if block is None and expert_chunk is None:
        return build_rows_op(expert_idx_TK, num_experts, num_rows)
    return _build_rows(expert_idx_TK, num_experts, block, expert_chunk, num_rows)


def _build_rows(expert_idx_TK: torch.Tensor, num_experts: int, block: Optional[int] = None,
                expert_chunk: Optional[int] = None, num_rows: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, K = expert_idx_TK.shape
    M, E = T * K, num_experts
    dev = expert_idx_TK.device
    idx_M = expert_idx_TK.reshape(-1).contiguous()
    if M == 0:
        def empty(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=dev)
        return empty(0), empty(0), empty(E), empty(T, K)  # four tensors: a custom op's outputs must not alias
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
# torch custom ops (opaque to torch.compile, fakes for FakeTensorMode / meta) and their autograd
# ----------------------------------------------------------------------------------------------------------------




def _check_rows(op: str, row_TK: torch.Tensor, src: torch.Tensor, weight_TK: Optional[torch.Tensor] = None) -> None:
    check_same_device(op, src, row_TK=row_TK, weight_TK=weight_TK)
    if row_TK.dtype != torch.int64 or row_TK.dim() != 2:
        raise ValueError(f"{op}: row_TK must be a 2-D int64 tensor, got {row_TK.dtype} {tuple(row_TK.shape)}")
    if src.dim() != 2:
        raise ValueError(f"{op}: rows must be 2-D [rows, D], got {tuple(src.shape)}")
    if weight_TK is not None and tuple(weight_TK.shape) != tuple(row_TK.shape):
        raise ValueError(f"{op}: weight_TK {tuple(weight_TK.shape)} must match row_TK {tuple(row_TK.shape)}")


@torch.library.custom_op(op_name("build_rows"), mutates_args=())
def build_rows_op(expert_idx_TK: torch.Tensor, num_experts: int, num_rows: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot_N, token_N, counts_E, row_TK). Without num_rows, N is data-dependent: one host sync in the real op,
    an unbacked size (new_dynamic_size) in the fake."""
    return _build_rows(expert_idx_TK, num_experts, num_rows=num_rows)


@build_rows_op.register_fake
def _build_rows_fake(expert_idx_TK, num_experts, num_rows=None):
    T, K = expert_idx_TK.shape
    if num_rows is None:
        num_rows = 0 if T * K == 0 else torch.library.get_ctx().new_dynamic_size(min=0, max=T * K)
    i64 = dict(dtype=torch.int64)
    return (expert_idx_TK.new_empty(num_rows, **i64), expert_idx_TK.new_empty(num_rows, **i64),
            expert_idx_TK.new_empty(num_experts, **i64), expert_idx_TK.new_empty(T, K, **i64))


@torch.library.custom_op(op_name("permute_rows"), mutates_args=())
def permute_rows_op(x_TD: torch.Tensor, row_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x_ND[row[t,k]] = x_TD[t] for the true slots (the scatter kernel, no weights)."""
    _check_rows("moe_train.permute_rows", row_TK, x_TD)
    return scatter_rows(x_TD, row_TK, num_rows)[0]


@permute_rows_op.register_fake
def _permute_rows_fake(x_TD, row_TK, num_rows):
    _check_rows("moe_train.permute_rows", row_TK, x_TD)
    return x_TD.new_empty(num_rows, x_TD.shape[1])


@torch.library.custom_op(op_name("combine_rows"), mutates_args=())
def combine_rows_op(y_ND: torch.Tensor, row_TK: torch.Tensor, weight_TK: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """out_TD[t] = sum over t's true slots of (weight *) y_ND[row] (the combine kernel)."""
    _check_rows("moe_train.combine_rows", row_TK, y_ND, weight_TK)
    return combine_rows(y_ND, row_TK, weight_TK)


@combine_rows_op.register_fake
def _combine_rows_fake(y_ND, row_TK, weight_TK=None):
    _check_rows("moe_train.combine_rows", row_TK, y_ND, weight_TK)
    return y_ND.new_empty(row_TK.shape[0], y_ND.shape[1])


@torch.library.custom_op(op_name("combine_rows_backward"), mutates_args=())
def combine_backward_op(grad_TD: torch.Tensor, row_TK: torch.Tensor, weight_TK: torch.Tensor, y_ND: torch.Tensor,
                        want_grad_y: bool, want_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_ND, grad_weight_TK) of the weighted combine in one scatter pass; an unwanted one is an empty tensor."""
    _check_rows("moe_train.combine_rows_backward", row_TK, grad_TD, weight_TK)
    check_same_device("moe_train.combine_rows_backward", grad_TD, y_ND=y_ND)
    gy, gw = scatter_rows(grad_TD, row_TK, y_ND.shape[0], weight_TK, y_ND=y_ND if want_grad_w else None,
                          write_rows=want_grad_y)
    return (gy if gy is not None else grad_TD.new_empty(0),
            gw if gw is not None else weight_TK.new_empty(0))


@combine_backward_op.register_fake
def _combine_backward_fake(grad_TD, row_TK, weight_TK, y_ND, want_grad_y, want_grad_w):
    _check_rows("moe_train.combine_rows_backward", row_TK, grad_TD, weight_TK)
    check_same_device("moe_train.combine_rows_backward", grad_TD, y_ND=y_ND)
    gy = grad_TD.new_empty(y_ND.shape[0], grad_TD.shape[1]) if want_grad_y else grad_TD.new_empty(0)
    return gy, weight_TK.new_empty(row_TK.shape if want_grad_w else (0,))


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, grad_ND):
    """grad_x[t] = sum of the grad rows of t's true slots: a combine without weights (once differentiable)."""
    (row_TK,) = ctx.saved_tensors
    return _sum_rows_per_token(grad_ND.contiguous(), row_TK), None, None


def _sum_rows_per_token(grad_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # once differentiable: nothing recorded for a double backward
        return combine_rows_op(grad_ND, row_TK, None)


def _combine_setup_context(ctx, inputs, output):
    y_ND, row_TK, weight_TK = inputs
    ctx.save_for_backward(y_ND, row_TK, weight_TK)


def _combine_backward(ctx, grad_TD):
    """Weighted: grad_y[row] = w * grad_out[t], grad_w = dot(grad_out[t], y[row]) (one scatter pass); unweighted
    (the backward of permute): grad_y[row] = grad_out[t] (a permute). Once differentiable."""
    y_ND, row_TK, weight_TK = ctx.saved_tensors
    want_gy, want_gw = ctx.needs_input_grad[0], weight_TK is not None and ctx.needs_input_grad[2]
    grad_TD = grad_TD.contiguous()
    with torch.no_grad():
        if weight_TK is None:
            return (permute_rows_op(grad_TD, row_TK, y_ND.shape[0]) if want_gy else None), None, None
        gy, gw = combine_backward_op(grad_TD, row_TK, weight_TK, y_ND, want_gy, want_gw)
    return (gy if want_gy else None), None, (gw if want_gw else None)


permute_rows_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)
combine_rows_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


def permute(x_TD: torch.Tensor, row_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x_ND[row[t,k]] = x_TD[t]; backward: grad_x[t] = sum of the grad rows of t's true slots (a combine)."""
    return permute_rows_op(x_TD, row_TK, num_rows)


def unpermute_combine(y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """out_TD[t] = sum_k w[t,k] y_ND[row[t,k]]; backward: grad_y[row] = w * grad_out[t], grad_w = dot(grad_out, y)."""
    return combine_rows_op(y_ND, row_TK, weight_TK)
