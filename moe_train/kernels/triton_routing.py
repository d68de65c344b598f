"""Routing in one pass, as a Triton kernel: logits -> fp32 scores -> biased top-k -> null mask -> renormalisation ->
counts, and its autograd wrapper. The torch reference (the routers' own math) is moe_train.kernels.routing.

One program takes BLOCK_T tokens and all N = E true + Z null experts of each (a [BLOCK_T, BLOCK_N] tile; BLOCK_T
and num_warps from route_config, so that the tile stays in registers: no ptxas spills, see aot_report):
    p      = softmax(z) in fp32 (or sigmoid(z))                              -> probs_TN (stored: aux loss, stats)
    s      = p + bias                                                        (selection only)
    k times: pick the largest s, the LOWEST index among exactly equal ones (the reference's stable descending sort,
             config null_tie_break "true_first"), then mark it taken          -> pick_TK; p at the picks
    true   = pick < E;  w = p_pick / sum over true picks (norm_topk_prob; a token with none divides by 1), else
             p_pick * true;  expert_idx = pick where true, else -1           -> weight_TK, expert_idx_TK
    counts_N[pick] += 1 (integer atomics: the totals do not depend on the order)
NaN: ordered as torch.sort / torch.topk order it, above every number (so as the reference): a NaN score is picked
first (lowest index among NaNs) and its weight is NaN, so a token with NaN logits (softmax: the whole row NaN)
routes to real experts with NaN weights and the NaN reaches the loss, where the trainer's checks see it. Every
pick is in [0, N); counts_N sums to T * k.
Backward (the custom op ``moe_train::route``, registered autograd): the gradient of weight_TK through the renormalisation and of probs_TN, then through the
softmax / sigmoid, in torch (``routing_backward``: a few [T, N] element-wise ops).
Like triton_permute, TRITON_INTERPRET=1 must be set before this module is first imported to run on CPU tensors.
Shape legend: T tokens, K picks per token, E true experts, N = E + Z scored experts (true, then null: the
routing/ exception of docs/shapes.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe_train.kernels.custom_ops import check_same_device, op_name

INTERPRETED = bool(triton.knobs.runtime.interpret)

BLOCK_T = 16  # tokens per program, at most (route_config: fewer for wide rows)
TILE_PER_THREAD = 16  # elements of each [BLOCK_T, BLOCK_N] tile per thread, at most (route_config)
SCORE_FUNCS = ("softmax", "sigmoid")  # the kernel's SIGMOID flag; moe_train.kernels.routing checks the name


# Selection keys: an fp32 score s as an int32 whose signed order is the float order (-inf < ... < -0 = +0 < ... <
# +inf), every NaN above +inf (torch.sort's and torch.topk's order: a NaN score is picked first), and TAKEN, below
# -inf's key (-2139095041), on picked and padding columns. An integer sentinel, not -inf: a score of -inf (a -inf
# bias) must stay pickable, and a NaN must never compare unequal to the row's maximum (the old float selection
# found no column equal to a NaN maximum and picked the padding index BLOCK_N: an all-null token whose count
# update landed past the end of counts_N).
TAKEN = tl.constexpr(-2147483647)


def route_config(N: int, K: int) -> dict:
    """Launch parameters of _route_kernel for N scored experts, K picks: BLOCK_T (tokens per program) and
    num_warps. Its two [BLOCK_T, BLOCK_N] tiles (fp32 scores p, int32 selection keys) stay in registers through the
    K rounds; at most TILE_PER_THREAD elements of each per thread keeps ptxas spill-free at every shape of
    aot_report.ROUTING_SHAPES on sm_90 and sm_100 (16 tokens x 1024 columns on 4 warps = 128 each spilled: 255
    registers at N = 768). route() launches with exactly these values; tests/test_kernels_aot.py compiles them."""
    block_n = triton.next_power_of_2(N)
    num_warps = 4 if block_n <= 256 else 8  # wide rows: more threads per token instead of fewer tokens only
    block_t = max(1, min(BLOCK_T, TILE_PER_THREAD * 32 * num_warps // block_n))
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(K), num_warps=num_warps)


@triton.jit
def _route_kernel(logit_ptr, bias_ptr, prob_ptr, pick_ptr, idx_ptr, w_ptr, count_ptr, T, N, E, K,
                  HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, NORM: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, BLOCK_N)
    in_t = t < T
    mask = in_t[:, None] & (n < N)[None, :]
    z = tl.load(logit_ptr + t[:, None] * N + n[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-z))
        p = tl.where(mask, p, 0.0)
    else:
        m = tl.max(z, axis=1)
        m = tl.where(in_t, m, 0.0)  # rows past T are all -inf: keep them finite
        e = tl.where(mask, tl.exp(z - m[:, None]), 0.0)
        den = tl.sum(e, axis=1)
        # den >= 1 on a row of T (its maximum contributes exp(0)) unless a logit is NaN or the maximum is +-inf:
        # then den, so the whole row, is NaN, as torch.softmax's. Only the padding rows (den 0) divide by 1.
        p = e / tl.where(in_t, den, 1.0)[:, None]
    tl.store(prob_ptr + t[:, None] * N + n[None, :], p, mask=mask)
    s = p
    if HAS_BIAS:
        s = s + tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    # p >= 0, so s is never -0.0 (+0 + -0 = +0): equal scores have equal keys, ties as in the reference.
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits, so larger = larger
    key = tl.where(s != s, 0x7FFFFFFF, key)  # NaN (either sign bit) above +inf
    key = tl.where(mask, key, TAKEN)
    ks = tl.arange(0, BLOCK_K)
    picks = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in range(0, K):  # K <= N: an untaken column remains, so best > TAKEN and pick < N
        best = tl.max(key, axis=1)
        pick = tl.min(tl.where(key == best[:, None], n[None, :], BLOCK_N), axis=1)  # lowest index among ties
        picks = tl.where(ks[None, :] == j, pick[:, None], picks)
        key = tl.where(n[None, :] == pick[:, None], TAKEN, key)
    in_k = ks < K
    mask_k = in_t[:, None] & in_k[None, :]
    # p at the picks, read back from probs_TN rather than carried through the K rounds: only the key tile stays
    # in registers (route_config). Other threads of this program stored those values: the barrier orders them.
    tl.debug_barrier()
    vals = tl.load(prob_ptr + t[:, None] * N + picks, mask=mask_k, other=0.0)
    true = (picks < E) & in_k[None, :]
    w = vals * true.to(tl.float32)  # a product, as the reference: a NaN score gives a NaN weight even on a null pick
    if NORM:
        den = tl.sum(w, axis=1)
        w = w / tl.where(den > 0, den, 1.0)[:, None]
    out = t[:, None] * K + ks[None, :]
    tl.store(pick_ptr + out, picks.to(tl.int64), mask=mask_k)
    tl.store(idx_ptr + out, tl.where(true, picks, -1).to(tl.int64), mask=mask_k)
    tl.store(w_ptr + out, w, mask=mask_k)
    # pick < N always (above); the bound is kept in the mask so that no pick can ever write past counts_N.
    tl.atomic_add(count_ptr + picks, tl.full([BLOCK_T, BLOCK_K], 1, tl.int32), mask=mask_k & (picks < N))


def route(logits_TN: torch.Tensor, top_k: int, num_true: int, bias_N: torch.Tensor | None = None,
          norm_topk_prob: bool = True, score_func: str = "softmax", block_t: int | None = None):
    """(probs_TN fp32, weight_TK fp32, expert_idx_TK int64 (-1 = null pick), counts_N int64, pick_TK int64).
    ``block_t``: tokens per program instead of route_config's (tests: several programs on small inputs)."""
    T, N = logits_TN.shape
    if not 0 <= top_k <= N:
        raise ValueError(f"top_k={top_k} must be in [0, N={N}] (N scored experts)")
    dev = logits_TN.device
    probs = torch.empty(T, N, dtype=torch.float32, device=dev)
    pick = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    counts = torch.zeros(N, dtype=torch.int32, device=dev)  # int32 atomics; returned as int64
    if T == 0 or top_k == 0:
        return probs, w, idx, counts.to(torch.int64), pick
    logits_TN = logits_TN.contiguous()
    bias = bias_N.contiguous() if bias_N is not None else logits_TN
    cfg = route_config(N, top_k)
    if block_t is not None:
        cfg["BLOCK_T"] = block_t
    _route_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        logits_TN, bias, probs, pick, idx, w, counts, T, N, num_true, top_k,
        HAS_BIAS=bias_N is not None, SIGMOID=score_func == "sigmoid", NORM=norm_topk_prob, **cfg)
    return probs, w, idx, counts.to(torch.int64), pick


def routing_backward(grad_probs_TN, grad_w_TK, probs_TN, pick_TK, num_true: int, norm_topk_prob: bool,
                     score_func: str) -> torch.Tensor:
    """d loss / d logits (fp32) from the gradients of probs_TN and weight_TK (either may be None)."""
    gp = torch.zeros_like(probs_TN) if grad_probs_TN is None else grad_probs_TN.float().clone()
    if grad_w_TK is not None:
        true = pick_TK < num_true
        p_K = probs_TN.gather(1, pick_TK) * true
        g = grad_w_TK.float() * true
        if norm_topk_prob:
            den = p_K.sum(1, keepdim=True)
            den = torch.where(den > 0, den, torch.ones_like(den))
            w = p_K / den
            g = (g - (g * w).sum(1, keepdim=True)) / den * true
        gp.scatter_add_(1, pick_TK, g)  # the picks of a token are distinct experts
    if score_func == "sigmoid":
        return gp * probs_TN * (1 - probs_TN)
    return probs_TN * (gp - (gp * probs_TN).sum(1, keepdim=True))




@torch.library.custom_op(op_name("route"), mutates_args=())
def route_op(logits_TN: torch.Tensor, bias_N: Optional[torch.Tensor], top_k: int, num_true: int,
             norm_topk_prob: bool, score_func: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """route() as a torch custom op (opaque to torch.compile / FakeTensorMode, fake below): (probs_TN, weight_TK,
    expert_idx_TK, counts_N, pick_TK)."""
    check_same_device("moe_train.route", logits_TN, bias_N=bias_N)
    return route(logits_TN, top_k, num_true, bias_N, norm_topk_prob, score_func)


@route_op.register_fake
def _route_fake(logits_TN, bias_N, top_k, num_true, norm_topk_prob, score_func):
    T, N = logits_TN.shape
    if not 0 <= top_k <= N:
        raise ValueError(f"top_k={top_k} must be in [0, N={N}] (N scored experts)")
    check_same_device("moe_train.route", logits_TN, bias_N=bias_N)
    f32, i64 = dict(dtype=torch.float32), dict(dtype=torch.int64)
    return (logits_TN.new_empty(T, N, **f32), logits_TN.new_empty(T, top_k, **f32),
            logits_TN.new_empty(T, top_k, **i64), logits_TN.new_empty(N, **i64), logits_TN.new_empty(T, top_k, **i64))


def _route_setup_context(ctx, inputs, output):
    logits_TN, _bias, _k, num_true, norm_topk_prob, score_func = inputs
    probs, _w, idx, counts, pick = output
    ctx.save_for_backward(probs, pick)
    ctx.cfg = (num_true, norm_topk_prob, score_func, logits_TN.dtype)
    ctx.mark_non_differentiable(idx, counts, pick)


def _route_backward(ctx, grad_probs, grad_w, _gi, _gc, _gp):
    """Once differentiable (routing_backward's ops are not recorded for a double backward)."""
    probs, pick = ctx.saved_tensors
    num_true, norm, score_func, dtype = ctx.cfg
    with torch.no_grad():
        g = routing_backward(grad_probs, grad_w, probs, pick, num_true, norm, score_func)
    return g.to(dtype), None, None, None, None, None


route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def route_differentiable(logits_TN: torch.Tensor, bias_N: Optional[torch.Tensor], top_k: int, num_true: int,
                         norm_topk_prob: bool, score_func: str):
    """(probs_TN, weight_TK, expert_idx_TK, counts_N): differentiable in logits_TN through probs and weights (the
    bias only selects: no gradient)."""
    probs, w, idx, counts, _pick = route_op(logits_TN, bias_N, top_k, num_true, norm_topk_prob, score_func)
    return probs, w, idx, counts
