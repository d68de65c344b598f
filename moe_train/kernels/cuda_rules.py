"""torch's CUDA rules for torch._grouped_mm / torch._scaled_grouped_mm, checked from shapes, dtypes and strides alone.

The CUDA kernels (aten/src/ATen/native/cuda/GroupedBlas.cpp) refuse operands that the CPU kernel takes (fp32,
unaligned strides, int64 offsets), and CI has no GPU: so the expert code calls ``check_grouped_mm`` on its CUDA
path before each call, and the tests run it (and torch's own meta kernel, torch/_meta_registrations.py
``_meta_grouped_mm_common``, which mirrors the CUDA checks) on operands built exactly as the expert code builds them.
Pure: reads .dtype / .shape / .stride() / .device only, so it works on real, meta and fake tensors alike.

Rules (torch 2.10-2.13):
  dtypes      _grouped_mm: a and b bfloat16; _scaled_grouped_mm: a and b float8_e4m3fn, scales float32
  ranks       a and b 2-D or 3-D; unless both are 2-D, a.size(-1) == b.size(-2) (the contraction)
  strides     each operand's last two dims are row- or column-major, with the leading stride a multiple of 16 bytes
              (8 bf16 elements, 16 fp8 elements) and at least the contiguous dim's size; _scaled_grouped_mm: a row-major,
              b column-major
  offsets     needed when a or b is 2-D: 1-D int32 (cumulative row ends), one per group (b.size(0) for 2-D x 3-D,
              a.size(0) for 3-D x 2-D); absent for 3-D x 3-D
  scales      2-D operand: contiguous 1-D, one per row (a) / column (b); 3-D operand: 2-D [groups, cols]
  out_dtype   None or bfloat16
  device      every tensor on one device (ours: a device mix is a bug upstream, worth a clear message)
Shape legend: N rows, I input features, O output features, E groups (experts).
"""

from __future__ import annotations

from typing import Optional

import torch

FP8_GROUPED_DTYPE = torch.float8_e4m3fn


class CudaRuleError(ValueError):
    """Operands that torch's CUDA grouped GEMM would refuse (or that would compute garbage)."""


def _fail(where: str, msg: str) -> None:
    raise CudaRuleError(f"{where or 'grouped GEMM'}: {msg} (torch's CUDA rules for torch._grouped_mm / "
                        "_scaled_grouped_mm; see moe_train/kernels/cuda_rules.py)")


def _check_strides(where: str, name: str, t: torch.Tensor) -> str:
    """'row' or 'col' (major order of the last two dims); raises on anything else or an unaligned leading stride."""
    align = 16 // t.element_size()
    st, sz = t.stride(), t.shape
    if st[-1] == 1 and st[-2] >= max(1, sz[-1]):
        lead, order = st[-2], "row"
    elif st[-2] == 1 and st[-1] >= max(1, sz[-2]):
        lead, order = st[-1], "col"
    else:
        _fail(where, f"{name} has strides {tuple(st)} for sizes {tuple(sz)}: its last two dims must be row- or "
                     "column-major (e.g. a .contiguous() copy)")
    if lead % align:
        _fail(where, f"{name}'s leading stride {lead} ({lead * t.element_size()} bytes, {t.dtype}) is not a multiple "
                     f"of 16 bytes: feature sizes must be multiples of {align} for {t.dtype}")
    return order


def check_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: Optional[torch.Tensor] = None, *,
                     scale_a: Optional[torch.Tensor] = None, scale_b: Optional[torch.Tensor] = None,
                     out_dtype: Optional[torch.dtype] = None, where: str = "", fallback_dtypes: bool = False) -> None:
    """Raises CudaRuleError where CUDA's torch._grouped_mm (no scales) / torch._scaled_grouped_mm (scales) would refuse
    these operands; None when they pass. ``fallback_dtypes``: accept fp32 / fp16 operands of _grouped_mm (eager CUDA
    runs them through its per-group fallback loop, grouped_gemm.fallback_reason; torch's meta kernel, hence
    torch.compile and FakeTensorMode, refuses them), every other rule still applies."""
    tensors = {"a": a, "b": b, "offs": offs, "scale_a": scale_a, "scale_b": scale_b}
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        _fail(where, "operands on different devices: " + ", ".join(f"{n} {d}" for n, d in devices.items()))
    if (scale_a is None) != (scale_b is None):
        _fail(where, "give both scales or neither")
    scaled = scale_a is not None
    want = FP8_GROUPED_DTYPE if scaled else torch.bfloat16
    fallback = fallback_dtypes and not scaled and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float16)
    if (a.dtype != want or b.dtype != want) and not fallback:
        _fail(where, f"{'_scaled_grouped_mm' if scaled else '_grouped_mm'} on CUDA takes {want} operands, got "
                     f"a {a.dtype}, b {b.dtype}" + ("" if scaled else " (cast to bf16: train.precision bf16)"))
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        _fail(where, f"operands must be 2-D or 3-D, got a {a.dim()}-D, b {b.dim()}-D")
    if not (a.dim() == 2 and b.dim() == 2) and a.shape[-1] != b.shape[-2]:
        _fail(where, f"contraction sizes differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    order_a, order_b = _check_strides(where, "a", a), _check_strides(where, "b", b)
    if scaled and (order_a != "row" or order_b != "col"):
        _fail(where, f"_scaled_grouped_mm wants a row-major and b column-major, got a {order_a}-major "
                     f"(strides {tuple(a.stride())}), b {order_b}-major (strides {tuple(b.stride())})")
    if a.dim() == 2 or b.dim() == 2:
        if offs is None:
            _fail(where, f"{a.dim()}-D x {b.dim()}-D needs offsets")
        if offs.dim() != 1 or offs.dtype != torch.int32:
            _fail(where, f"offsets must be a 1-D int32 tensor, got {offs.dim()}-D {offs.dtype}")
        groups = b.shape[0] if b.dim() == 3 else a.shape[0] if a.dim() == 3 else offs.shape[0]
        if offs.shape[0] != groups:
            _fail(where, f"{offs.shape[0]} offsets for {groups} groups")
    elif offs is not None:
        _fail(where, "3-D x 3-D takes no offsets")
    if scaled:
        for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
            if s.dtype != torch.float32:
                _fail(where, f"{name} must be float32, got {s.dtype}")
        mult = offs.shape[0] if (a.dim() == 2 and b.dim() == 2) else 1
        for name, s, mat, dim in (("scale_a", scale_a, a, 0), ("scale_b", scale_b, b, 1)):
            if mat.dim() == 2:
                if not s.is_contiguous() or s.dim() != 1 or s.shape[0] != mat.shape[dim] * mult:
                    _fail(where, f"{name} must be contiguous 1-D of {mat.shape[dim] * mult}, got "
                                 f"{tuple(s.shape)} strides {tuple(s.stride())}")
            elif s.dim() != 2 or s.stride(-1) != 1 or s.shape[0] != mat.shape[0] or s.shape[1] != mat.shape[1 + dim]:
                _fail(where, f"{name} must be 2-D [{mat.shape[0]}, {mat.shape[1 + dim]}] with a unit last stride, got "
                             f"{tuple(s.shape)} strides {tuple(s.stride())}")
    if out_dtype not in (None, torch.bfloat16):
        _fail(where, f"out_dtype must be bfloat16 (or None), got {out_dtype}")
