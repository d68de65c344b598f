"""What the Triton kernels' torch custom ops share: their registered names, and the check that every operand of a
launch lives on one device (triton_routing.py, triton_permute.py)."""

from __future__ import annotations

from typing import Optional

import torch


def op_name(base: str) -> str:
    """``moe_train::<base>``, or ``<base>_<n>`` when a copy of this module registered it already (tests import a fresh
    copy under TRITON_INTERPRET: each copy's op must launch that copy's kernels)."""
    name, n = base, 0
    while hasattr(torch.ops.moe_train, name):
        n += 1
        name = f"{base}_{n}"
    return f"moe_train::{name}"


def check_same_device(op: str, first: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """A kernel reads raw pointers: every operand must live on the first one's device (a CPU tensor handed to a CUDA
    launch is an illegal address at best). Raised by the real launch and by the fake (FakeTensorMode, torch.compile)."""
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device}, the other operands on {first.device}; every operand of "
                             "the Triton kernels must be on one device")
