"""Grouped GEMM over experts: y_NO = x_NI @ w_EIO[expert of row], rows grouped by expert with counts_E.

Backends (one interface, chosen by name; config ``moe.gemm_backend``):
  grouped_mm      torch._grouped_mm (fp32 on CPU, bf16 on GPU). Needs 16-byte aligned strides (dims multiple of
                  4 in fp32, 8 in bf16); raises otherwise. On CUDA its fused kernel takes bf16 on compute capability
                  9.x / 10.x only; anything else (fp32, fp16, older GPUs) runs torch's fallback, a loop over the
                  experts after a host sync on the offsets, which is logged once (fallback_reason).
  loop            a per-expert loop of plain matmuls: the reference (and as fast on CPU, where time is GEMM-bound).
  auto            grouped_mm where the shapes allow it, else loop; both compute the same products.
  te              Transformer Engine GroupedLinear in the input dtype (bf16). CUDA + transformer_engine only.
  te_fp8          Transformer Engine GroupedLinear under FP8 autocast, DelayedScaling HYBRID recipe (e4m3 forward,
                  e5m2 gradients, amax history 16); every expert's rows padded to 16. CUDA + transformer_engine.
  fp8_rowwise     FP8 through torch._scaled_mm / torch._scaled_grouped_mm, no TE; rowwise current scaling
  fp8_tensorwise  the same with one scale per tensor (per expert for weights). Recipe: moe_train.kernels.fp8.
Every backend returns the same [N, O] rows and gradients for x and w (FP8 ones up to FP8 rounding).
Precision (one rule for every backend, applied in ``grouped_mm`` before dispatch; see ``compute_dtype``): under
torch.autocast the operands are cast to the autocast dtype (autocast has no rule for torch._grouped_mm or for our
autograd Functions, so without this fp32 master weights would run the GEMM in fp32); otherwise operands of one
dtype run in it, and a bf16/fp16 operand meeting an fp32 one runs in the low precision. The result has the compute
dtype; x and w get gradients in their own dtypes. FP8 backends quantise from the compute dtype; their wgrad runs in it.
Shape legend (docs/shapes.md): N rows (true assignments), Np padded rows, I input features, O output features,
E experts.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from moe_train.kernels.cuda_rules import check_grouped_mm
from moe_train.kernels.fp8 import ALIGN_ROWS, check_fp8_shapes, grouped_mm_fp8, pad_groups

# Expert GEMM backends (model.moe.gemm_backend; docs/kernels.md): the one list, config.py types its key with it.
GEMM_BACKENDS = ("auto", "grouped_mm", "loop", "te", "te_fp8", "fp8_rowwise", "fp8_tensorwise")
BACKENDS = GEMM_BACKENDS

_LOW = (torch.bfloat16, torch.float16)
logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # fallback reasons already logged (once per process each)


def compute_dtype(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMM runs in for these operands in the current autocast state (see the docstring)."""
    dev = x_NI.device.type
    # meta tensors (shape rehearsals) have no autocast state: torch.is_autocast_enabled("meta") raises
    if dev != "meta" and torch.is_autocast_enabled(dev) and torch.float64 not in (x_NI.dtype, w_EIO.dtype):
        return torch.get_autocast_dtype(dev)  # what autocast does to a matmul's fp32/fp16/bf16 operands
    if x_NI.dtype == w_EIO.dtype:
        return x_NI.dtype
    low = [d for d in (x_NI.dtype, w_EIO.dtype) if d in _LOW]
    if len(low) == 2:
        raise ValueError(f"grouped GEMM operands in float16 and bfloat16 (x {x_NI.dtype}, w {w_EIO.dtype}): no "
                         "common precision; keep activations and expert weights in one low-precision dtype")
    if low:
        # bf16 activations meeting fp32 weights (or the reverse) belong to a bf16 run: upcasting would put the
        # GEMM back in fp32, which is what bf16 training must never do.
        return low[0]
    # float32 against float64 (references): the narrower one, as the low-precision case
    return min((x_NI.dtype, w_EIO.dtype), key=lambda d: torch.finfo(d).bits)


def _aligned(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can take these operands: a supported dtype and 16-byte aligned strides."""
    if x_NI.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # e.g. float64 references: the loop computes the same products
    align = 16 // x_NI.element_size()
    return x_NI.shape[1] % align == 0 and w_EIO.shape[2] % align == 0


def grouped_mm_loop(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert over its contiguous block of rows (host sync on counts)."""
    # unbind, not w_EIO[e]: each select's backward would write a full-size zero [E, I, O] gradient per expert.
    outs = [xe @ we for xe, we in zip(torch.split(x_NI, counts_E.tolist()), w_EIO.unbind(0))]
    return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EIO.shape[2])


def fallback_reason(x_NI: torch.Tensor) -> Optional[str]:
    """Why torch._grouped_mm would run its per-expert fallback loop on these CUDA operands; None when it runs its
    fused kernel (or on CPU, where there is only one path). torch 2.10's GroupedBlas.cpp takes the fused CUTLASS
    kernel for bf16 operands on compute capability 9.x / 10.x only."""
    if not x_NI.is_cuda:
        return None
    if x_NI.dtype != torch.bfloat16:
        return (f"{x_NI.dtype} operands: torch._grouped_mm's fused CUDA kernel is bf16 only (train in bf16, e.g. "
                "parallelize_model(param_dtype=torch.bfloat16) or autocast)")
    major, minor = torch.cuda.get_device_capability(x_NI.device)
    if major not in (9, 10):
        return (f"compute capability {major}.{minor}: torch._grouped_mm's fused kernel is built for 9.x (Hopper) and "
                "10.x (Blackwell)")
    return None


def grouped_mm_torch(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    reason = fallback_reason(x_NI)
    if reason is not None and reason not in _WARNED:
        # silent otherwise: the result is right, only slow (a host sync and one GEMM per expert, per call)
        _WARNED.add(reason)
        logger.warning(f"grouped GEMM: torch._grouped_mm falls back to a per-expert loop with a host sync: {reason}")
    if x_NI.shape[0] == 0:
        # _grouped_mm's backward rejects an empty input; an empty matmul gives the same (zero) gradients.
        return x_NI @ w_EIO[0]
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    if x_NI.is_cuda or w_EIO.is_cuda:  # CUDA's rules (cuda_rules.py): clear errors instead of a CUDA-side failure
        check_grouped_mm(x_NI, w_EIO, offs, where="grouped_mm", fallback_dtypes=reason is not None)
    y_NO = torch._grouped_mm(x_NI, w_EIO, offs=offs)
    if y_NO.requires_grad:
        # _grouped_mm's backward fails on stride-0 (expanded) gradients, e.g. from .sum(): make them dense.
        y_NO.register_hook(lambda g: g.contiguous())
    return y_NO


# ----------------------------------------------------------------------------------------------------------------
# Transformer Engine
# ----------------------------------------------------------------------------------------------------------------

# One GroupedLinear per expert weight tensor (keyed weakly by the caller's tensor, not by its per-call cast copy)
# and compute dtype, so that each keeps its own FP8 amax history. The module owns no weights: every call binds views
# of that call's w_EIO and unbinds them afterwards, so gradients flow to w_EIO through autograd and the module never
# keeps the weight alive.
_TE_MODULES: "weakref.WeakKeyDictionary[torch.Tensor, dict[torch.dtype, torch.nn.Module]]" = weakref.WeakKeyDictionary()
_TE_RECIPE = None


def _te():
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError, RuntimeError) as e:  # OSError/RuntimeError: installed but CUDA libraries missing
        raise ImportError(f"gemm_backend 'te' / 'te_fp8' needs NVIDIA Transformer Engine with its PyTorch extension "
                          f"and a CUDA GPU (import failed: {e}). Install transformer_engine[pytorch], or use "
                          "gemm_backend: grouped_mm (bf16) or fp8_rowwise (FP8 without TE).") from e
    return te


def _fp8_autocast(te):
    global _TE_RECIPE
    if _TE_RECIPE is None:
        from transformer_engine.common.recipe import DelayedScaling, Format
        # reduce_amax=False: each call enters its own autocast region, and TE's default all-reduces the amaxes over
        # the world at every region's exit: one world-wide collective per expert GEMM. The experts a rank holds are
        # its own (ep), so a per-rank amax history is the right scale anyway.
        _TE_RECIPE = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max",
                                    reduce_amax=False)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast(fp8_recipe=) to autocast(recipe=)
        return te.autocast(enabled=True, recipe=_TE_RECIPE)
    return te.fp8_autocast(enabled=True, fp8_recipe=_TE_RECIPE)


def _te_module(te, w_EIO: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    by_dtype = _TE_MODULES.setdefault(w_EIO, {})
    mod = by_dtype.get(dtype)
    if mod is None:
        E, I, O = w_EIO.shape
        mod = te.GroupedLinear(E, I, O, bias=False, params_dtype=dtype, device=w_EIO.device)
        for e in range(E):  # free TE's own weights: ours are bound per call
            mod._parameters[f"weight{e}"] = None
        by_dtype[dtype] = mod
    return mod


def _require_cuda(x_NI: torch.Tensor, backend: str) -> None:
    if not x_NI.is_cuda:
        raise ValueError(f"gemm_backend {backend!r} needs CUDA tensors, got {x_NI.device}; "
                         "use gemm_backend: auto on CPU")


def grouped_mm_te(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, fp8: bool) -> torch.Tensor:
    """x_NI already in the compute dtype; w_EIO as the caller holds it (it keys the module), cast here."""
    te = _te()
    _require_cuda(x_NI, "te_fp8" if fp8 else "te")
    if fp8:
        check_fp8_shapes(x_NI, w_EIO, "te_fp8")
    if x_NI.shape[0] == 0:
        return x_NI @ w_EIO[0].to(x_NI.dtype)
    E = w_EIO.shape[0]
    if fp8:
        # TE's FP8 GEMMs need every expert's row count to be a multiple of 16: zero-pad each block.
        counts_pad_E = (counts_E + ALIGN_ROWS - 1) // ALIGN_ROWS * ALIGN_ROWS
        m_splits = counts_pad_E.tolist()  # TE takes python ints: the one host sync
        x_in, _, pos_N = pad_groups(x_NI, counts_E, ALIGN_ROWS, num_rows=sum(m_splits))
    else:
        m_splits, x_in, pos_N = counts_E.tolist(), x_NI.contiguous(), None  # TE views the input as [-1, I]
    mod = _te_module(te, w_EIO, x_NI.dtype)
    # TE wants weight{e} as [O, I] in the activation dtype (it asserts parameter and input dtypes match outside
    # torch autocast); the transpose copy's backward hands the gradient back to w_EIO. One copy per call, cast and
    # transpose together: our experts are stored [E, I, O], and a cached copy would go stale at every optimizer
    # step and could not carry the gradient (only storing the weights as [E, O, I] would remove it).
    # (.to returns the view itself when the dtype already matches: .contiguous() then makes the one copy)
    w_EOI = w_EIO.transpose(1, 2).to(dtype=x_NI.dtype, memory_format=torch.contiguous_format).contiguous()
    try:
        for e in range(E):
            mod._parameters[f"weight{e}"] = w_EOI[e]
        if fp8:
            with _fp8_autocast(te):
                y = mod(x_in, m_splits)
        else:
            y = mod(x_in, m_splits)
    finally:
        for e in range(E):
            mod._parameters[f"weight{e}"] = None
    return y if pos_N is None else y.index_select(0, pos_N)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y_NO in ``compute_dtype(x_NI, w_EIO)`` on every backend (the casts are differentiable: gradients return to
    x_NI and w_EIO in their own dtypes, e.g. fp32 master weights)."""
    dtype = compute_dtype(x_NI, w_EIO)
    x_NI = x_NI.to(dtype)
    if backend in ("te", "te_fp8"):  # w cast inside: the caller's tensor keys TE's module (its FP8 amax history)
        return grouped_mm_te(x_NI, w_EIO, counts_E, fp8=backend == "te_fp8")
    w_EIO = w_EIO.to(dtype)
    if backend == "loop":
        return grouped_mm_loop(x_NI, w_EIO, counts_E)
    if backend in ("fp8_rowwise", "fp8_tensorwise"):
        return grouped_mm_fp8(x_NI, w_EIO, counts_E, scaling=backend.removeprefix("fp8_"))
    if backend not in BACKENDS:
        raise ValueError(f"gemm_backend {backend!r} is not one of {BACKENDS}")
    if backend == "grouped_mm" or (backend == "auto" and _aligned(x_NI, w_EIO)):
        if not _aligned(x_NI, w_EIO):
            raise ValueError(f"gemm_backend 'grouped_mm' needs feature sizes that are multiples of "
                             f"{16 // x_NI.element_size()} for {x_NI.dtype}; got in={x_NI.shape[1]}, "
                             f"out={w_EIO.shape[2]}. Use gemm_backend: auto or loop.")
        return grouped_mm_torch(x_NI, w_EIO, counts_E)
    assert backend == "auto", backend
    return grouped_mm_loop(x_NI, w_EIO, counts_E)
