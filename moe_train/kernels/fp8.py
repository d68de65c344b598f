"""FP8 grouped GEMM without Transformer Engine: torch._scaled_mm / torch._scaled_grouped_mm with current scaling.

Recipe (no amax history: every scale comes from the tensor being cast, "current scaling"):
  forward  y = x @ w per expert. x is cast to e4m3 and w to e4m3, scale = amax / 448 (e4m3's largest finite
           value), so the largest magnitude maps to 448 exactly; the GEMM accumulates in fp32 and applies
           scale_x * scale_w to the output.
             rowwise:    one scale per token row of x, one per output column of every expert's w [I, O].
             tensorwise: one scale for x, one per expert for w.
  dgrad    grad_x = grad_y @ w^T, also in FP8. rowwise: grad_y rows in e4m3 (rowwise kernels take e4m3 only;
           the per-row scale gives the range that e5m2 would), w re-cast with one scale per INPUT row (the
           contraction of dgrad runs over O). tensorwise: grad_y in e5m2 (the "HYBRID" format: gradients need range
           more than precision), w with one scale per expert.
  wgrad    grad_w = x^T @ grad_y in the compute dtype (bf16 in bf16 runs, fp32 otherwise), never FP8: it sums over every
           token of an expert, and rowwise scales cannot run along that contraction dim.
GPU path: rowwise on compute capability >= 9.0 uses one torch._scaled_grouped_mm over all experts (groups padded to
16 rows, no host sync); otherwise one torch._scaled_mm per expert (a host sync reads the counts). Feature sizes
must be multiples of 16 (the FP8 tensor-core tile). torch._scaled_mm also runs on CPU (exactly the dequantised
product), which is how the tests check the recipe; torch._scaled_grouped_mm is CUDA-only.
Shape legend: N rows grouped by expert, Np padded rows, I input features, O output features, E experts.
"""

from __future__ import annotations

import torch

from moe_train.kernels.cuda_rules import check_grouped_mm

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
SCALINGS = ("rowwise", "tensorwise")
ALIGN_ROWS = 16  # FP8 grouped kernels want every expert's row block to be a multiple of 16 rows
MIN_SCALE = 1e-12  # an all-zero row / tensor gets this scale (its codes are all 0 anyway)


def quantize(x: torch.Tensor, fp8_dtype: torch.dtype, reduce_dims: tuple[int, ...] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ q.float() * scale. The amax (hence the scale) is taken over reduce_dims (keepdim; None = whole tensor);
    scale = amax / fp8_max, so the largest |x| of each slice maps to the largest finite FP8 value."""
    ax = x.detach().abs().float()
    amax = ax.amax() if reduce_dims is None else ax.amax(dim=reduce_dims, keepdim=True)
    scale = (amax / FP8_MAX[fp8_dtype]).clamp(min=MIN_SCALE)
    fmax = FP8_MAX[fp8_dtype]
    q = (x.detach().float() / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def pad_groups(x_NI: torch.Tensor, counts_E: torch.Tensor, align: int, num_rows: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad every expert's row block to a multiple of ``align`` rows, on device.

    Returns (x_NpI, counts_pad_E, pos_N): x_NpI[pos_N[i]] = x_NI[i], pad rows are 0 (they add nothing to any
    product and are dropped from outputs). Np = num_rows if given (exact: the caller synced), else the sync-free
    upper bound N + (align - 1) * E (rows past the last padded offset are unused). Differentiable in x.
    """
    N, E = x_NI.shape[0], counts_E.shape[0]
    counts_E = counts_E.to(torch.int64)
    counts_pad_E = (counts_E + align - 1) // align * align
    start_E = torch.cumsum(counts_E, 0) - counts_E
    start_pad_E = torch.cumsum(counts_pad_E, 0) - counts_pad_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_NI.device), counts_E, output_size=N)
    pos_N = torch.arange(N, device=x_NI.device) - start_E[expert_N] + start_pad_E[expert_N]
    Np = num_rows if num_rows is not None else N + (align - 1) * E
    x_NpI = x_NI.new_zeros(Np, x_NI.shape[1]).index_copy(0, pos_N, x_NI)
    return x_NpI, counts_pad_E, pos_N


def check_fp8_shapes(x_NI: torch.Tensor, w_EIO: torch.Tensor, backend: str) -> None:
    I, O = w_EIO.shape[1], w_EIO.shape[2]
    if I % 16 or O % 16:
        raise ValueError(f"gemm_backend {backend!r} needs feature sizes that are multiples of 16 (FP8 GEMM tiles); "
                         f"got in={I}, out={O}. Use gemm_backend: grouped_mm or loop for these sizes.")


def _use_grouped_kernel(x: torch.Tensor, scaling: str) -> bool:
    return (scaling == "rowwise" and x.is_cuda and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def _out_dtype(x: torch.Tensor, scaling: str) -> torch.dtype:
    # cuBLAS rowwise-scaled FP8 GEMMs write bf16 only; tensorwise (and the CPU kernel) can write the input dtype.
    return torch.bfloat16 if (scaling == "rowwise" and x.is_cuda) else x.dtype


def _scaled_mm_grouped(a_NK: torch.Tensor, sa: torch.Tensor, b_EKO: torch.Tensor, sb: torch.Tensor,
                       counts_E: torch.Tensor, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """sum-free grouped product of FP8 operands: rows of expert e times b_EKO[e] (column-major [K, O] views).

    rowwise: sa [N, 1] per row, sb [E, 1, O] per output column; tensorwise: sa scalar-like, sb [E, 1, 1].
    """
    E, O = b_EKO.shape[0], b_EKO.shape[2]
    if _use_grouped_kernel(a_NK, "rowwise" if rowwise else "tensorwise"):
        a_NpK, counts_pad_E, pos_N = pad_groups(a_NK.view(torch.uint8), counts_E, ALIGN_ROWS)
        a_NpK = a_NpK.view(a_NK.dtype)  # index_copy on the raw bytes: FP8 index ops are not implemented everywhere
        sa_Np = torch.ones(a_NpK.shape[0], dtype=torch.float32, device=a_NK.device)
        sa_Np[pos_N] = sa.reshape(-1)
        offs = torch.cumsum(counts_pad_E, 0, dtype=torch.int32)
        sb_EO = sb.reshape(E, O).contiguous()
        check_grouped_mm(a_NpK, b_EKO, offs, scale_a=sa_Np, scale_b=sb_EO, out_dtype=torch.bfloat16,
                         where="fp8 _scaled_grouped_mm")
        y_NpO = torch._scaled_grouped_mm(a_NpK, b_EKO, sa_Np, sb_EO, offs=offs, out_dtype=torch.bfloat16)
        return y_NpO.index_select(0, pos_N).to(out_dtype)
    outs, start = [], 0
    for e, m in enumerate(counts_E.tolist()):
        if m:
            sa_e = sa[start:start + m] if rowwise else sa.reshape(1, 1)
            sb_e = sb[e].reshape(1, O) if rowwise else sb[e].reshape(1, 1)
            outs.append(torch._scaled_mm(a_NK[start:start + m], b_EKO[e], scale_a=sa_e.contiguous(),
                                         scale_b=sb_e.contiguous(), out_dtype=out_dtype))
        start += m
    return torch.cat(outs) if outs else torch.zeros(0, O, dtype=out_dtype, device=a_NK.device)


def _wgrad(x_NI: torch.Tensor, g_NO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """grad_w[e] = x_e^T @ g_e in the input precision; 0 for an empty expert."""
    E, I, O = counts_E.shape[0], x_NI.shape[1], g_NO.shape[1]
    if x_NI.shape[0] == 0:
        return x_NI.new_zeros(E, I, O)
    x_NI, g_NO = x_NI.contiguous(), g_NO.contiguous()
    if x_NI.is_cuda and x_NI.dtype == torch.bfloat16:
        # 2d x 2d grouped GEMM: one [I, O] product per group of rows, no host sync.
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        check_grouped_mm(x_NI.t(), g_NO, offs, where="fp8 wgrad _grouped_mm")
        return torch._grouped_mm(x_NI.t(), g_NO, offs=offs)
    parts = zip(torch.split(x_NI, counts_E.tolist()), torch.split(g_NO, counts_E.tolist()))
    return torch.stack([xe.t() @ ge for xe, ge in parts])


class Fp8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, scaling: str) -> torch.Tensor:
        rowwise = scaling == "rowwise"
        ctx.save_for_backward(x_NI, w_EIO, counts_E)
        ctx.scaling = scaling
        xq, sx = quantize(x_NI, E4M3, (1,) if rowwise else None)
        # w as [E, O, I] contiguous, so that w[e].t() is the column-major [I, O] operand _scaled_mm wants.
        wq_EOI, sw = quantize(w_EIO.transpose(1, 2).contiguous(), E4M3, (2,) if rowwise else (1, 2))
        sw = sw.reshape(-1, 1, w_EIO.shape[2] if rowwise else 1)
        y = _scaled_mm_grouped(xq, sx, wq_EOI.transpose(1, 2), sw, counts_E, _out_dtype(x_NI, scaling), rowwise)
        return y.to(x_NI.dtype)

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):
        x_NI, w_EIO, counts_E = ctx.saved_tensors
        rowwise = ctx.scaling == "rowwise"
        g_NO = g_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq, sg = quantize(g_NO, E4M3 if rowwise else E5M2, (1,) if rowwise else None)
            # dgrad contracts over O: w[e] [I, O] contiguous, so w[e].t() is the column-major [O, I] operand.
            wq_EIO, sw = quantize(w_EIO.contiguous(), E4M3, (2,) if rowwise else (1, 2))
            sw = sw.reshape(-1, 1, w_EIO.shape[1] if rowwise else 1)
            grad_x = _scaled_mm_grouped(gq, sg, wq_EIO.transpose(1, 2), sw, counts_E,
                                        _out_dtype(g_NO, ctx.scaling), rowwise).to(x_NI.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _wgrad(x_NI, g_NO.to(x_NI.dtype), counts_E).to(w_EIO.dtype)
        return grad_x, grad_w, None, None


def grouped_mm_fp8(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, scaling: str) -> torch.Tensor:
    if scaling not in SCALINGS:
        raise ValueError(f"FP8 scaling {scaling!r} is not one of {SCALINGS}")
    check_fp8_shapes(x_NI, w_EIO, f"fp8_{scaling}")
    if x_NI.shape[0] == 0:  # no rows: an empty matmul gives the same (zero) output and gradients
        return x_NI @ w_EIO[0]
    return Fp8GroupedMM.apply(x_NI, w_EIO, counts_E, scaling)
