"""Grouped GEMM over experts: y_N? = x_N? @ w_E??[expert of row], rows grouped by expert with counts_E.

Backends (one interface, chosen by name):
  grouped_mm  torch._grouped_mm (fp32 on CPU, bf16 on GPU). Needs 16-byte aligned strides (dims multiple of
              4 in fp32, 8 in bf16); raises otherwise.
  loop        a per-expert loop of plain matmuls: the reference (and as fast on CPU, where time is GEMM-bound).
  auto        grouped_mm where the shapes allow it, else loop; both compute the same products.
Shape legend: N rows (true assignments), I input features, O output features, E experts.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "grouped_mm", "loop")


def _aligned(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    align = 16 // x_NI.element_size()
    return x_NI.shape[1] % align == 0 and w_EIO.shape[2] % align == 0


def grouped_mm_loop(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert over its contiguous block of rows (host sync on counts)."""
    outs = [xe @ w_EIO[e] for e, xe in enumerate(torch.split(x_NI, counts_E.tolist()))]
    return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EIO.shape[2])


def grouped_mm_torch(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    if x_NI.shape[0] == 0:
        # _grouped_mm's backward rejects an empty input; an empty matmul gives the same (zero) gradients.
        return x_NI @ w_EIO[0]
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_NO = torch._grouped_mm(x_NI, w_EIO, offs=offs)
    if y_NO.requires_grad:
        # _grouped_mm's backward fails on stride-0 (expanded) gradients, e.g. from .sum(): make them dense.
        y_NO.register_hook(lambda g: g.contiguous())
    return y_NO


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if backend == "loop":
        return grouped_mm_loop(x_NI, w_EIO, counts_E)
    if backend == "grouped_mm" or (backend == "auto" and _aligned(x_NI, w_EIO)):
        if not _aligned(x_NI, w_EIO):
            raise ValueError(f"gemm_backend 'grouped_mm' needs feature sizes that are multiples of "
                             f"{16 // x_NI.element_size()} for {x_NI.dtype}; got in={x_NI.shape[1]}, "
                             f"out={w_EIO.shape[2]}. Use gemm_backend: auto or loop.")
        return grouped_mm_torch(x_NI, w_EIO, counts_E)
    assert backend == "auto", backend
    return grouped_mm_loop(x_NI, w_EIO, counts_E)
