"""Token permutation for a routing plan with -1 (null / unused) slots: backend dispatch + plain-torch reference.

build_permutation groups the TRUE slots by expert; permute gathers their rows; unpermute_combine scatters expert
outputs back to tokens with the slot weights. Null slots are never gathered, so the work and memory of a layer
scale with the number of true assignments N, not with T*K.

Backends (``backend=`` on every function; config ``moe.permute_backend``):
  auto    Triton kernels (moe_train.kernels.triton_permute) on CUDA tensors when triton is installed, the torch
          reference otherwise (CPU). Both give the same rows in the same order; sums may differ in the last bit.
  torch   the torch path (kernels/gather_combine.py), on any device: a sort-free counting build (a stable argsort
          above gather_combine.COUNTING_MAX_EXPERTS experts: the same rows), index_select, and a gather-based
          combine (embedding_bag per token; no index_add_ / scatter_add_ in forward or backward: deterministic).
  triton  the Triton kernels; needs the triton package and CUDA tensors, or CPU tensors with TRITON_INTERPRET=1
          set before moe_train.kernels.triton_permute is first imported (slow; for tests).
Shape legend: T tokens, K slots per token, D hidden, E experts, N true assignments.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

from moe_train.kernels import gather_combine as GC

# Permutation backends (model.moe.permute_backend): auto (Triton on CUDA, the torch reference on CPU) | torch |
# triton. The one list; config.py types its key with it.
PERMUTE_BACKENDS = ("auto", "torch", "triton")
BACKENDS = PERMUTE_BACKENDS

_TRITON_MODULE = "moe_train.kernels.triton_permute"


@dataclass
class Permutation:
    """Rows grouped by expert (stable: ascending flat slot id t*K + k within an expert).

    slot_N: flat slot id of each grouped row; token_N: its token; counts_E: rows per expert;
    row_TK: grouped row of each slot, -1 on null / unused slots (built by both backends; the Triton row kernels
    index through it so that a token's row is read once and null slots are never touched).
    slots_Ns / rows_Ns / offsets_T: the gather form of the torch path (kernels/gather_combine.py): the true slots in
    slot order, their rows, and where each token's slots start; filled by the torch build, else on first use.
    """

    slot_N: torch.Tensor
    token_N: torch.Tensor
    counts_E: torch.Tensor
    row_TK: Optional[torch.Tensor] = None
    slots_Ns: Optional[torch.Tensor] = None
    rows_Ns: Optional[torch.Tensor] = None
    offsets_T: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.slot_N.shape[0]

    def gather_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots_Ns, rows_Ns, offsets_T), computed from row_TK once if the build did not fill them."""
        if self.rows_Ns is None:
            self.slots_Ns, self.rows_Ns, self.offsets_T = GC.gather_index_from_rows(_require_rows(self), self.num_rows)
        return self.slots_Ns, self.rows_Ns, self.offsets_T


def _triton_kernels():
    # Imported lazily (and through sys.modules each call) so that a CPU-only process never needs triton and so that
    # tests can swap in a copy of the module defined under TRITON_INTERPRET=1.
    try:
        return importlib.import_module(_TRITON_MODULE)
    except ImportError as e:
        raise ImportError(f"permute backend 'triton' needs the triton package ({e}); install triton or use "
                          "permute_backend: torch (or auto: triton only on CUDA when it is installed)") from e


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"permute backend {backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return t.is_cuda and _triton_installed()
    kernels = _triton_kernels()
    if not t.is_cuda and not kernels.INTERPRETED:
        raise ValueError(f"permute backend 'triton' got a {t.device.type} tensor: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before moe_train.kernels.triton_permute is imported, to run them "
                         "on CPU in the interpreter); use permute_backend: torch or auto on CPU")
    return True


def _require_rows(perm: Permutation) -> torch.Tensor:
    if perm.row_TK is None:
        raise ValueError("permute backend 'triton' needs Permutation.row_TK (the row of every slot); build the "
                         "permutation with build_permutation(), or use permute_backend: torch")
    return perm.row_TK


def build_permutation(expert_idx_TK: torch.Tensor, num_experts: int, backend: str = "auto",
                      num_rows: Optional[int] = None) -> Permutation:
    """The true slots grouped by expert in stable order (ascending flat slot id within an expert), by a counting
    pass (kernels/gather_combine.py; the order a stable argsort would give). One host sync: the number of true
    rows sizes the output, and the ids are checked in the same read. A caller that already holds that number on the host (the expert-parallel
    dispatcher reads it from its count exchange) passes ``num_rows``: then there is no sync and no id check (the
    ids come from a router, an internal invariant)."""
    if _use_triton(backend, expert_idx_TK):
        slot_N, token_N, counts_E, row_TK = _triton_kernels().build_rows(expert_idx_TK, num_experts,
                                                                          num_rows=num_rows)
        return Permutation(slot_N=slot_N, token_N=token_N, counts_E=counts_E, row_TK=row_TK)
    T, K = expert_idx_TK.shape
    flat = expert_idx_TK.reshape(-1)
    key = torch.where(flat < 0, num_experts, flat).clamp(max=num_experts)
    counts = torch.bincount(key, minlength=num_experts + 1)
    if num_rows is not None:
        num_true, num_bad = num_rows, 0
    else:
        bad = (flat < -1) | (flat >= num_experts)
        num_true, num_bad = torch.stack([counts[:num_experts].sum(), bad.sum()]).tolist()
    if num_bad:
        raise ValueError(f"expert_idx holds {num_bad} ids outside [-1, {num_experts}) (num_experts={num_experts}); "
                         "valid ids are 0..num_experts-1, and -1 for null / unused slots")
    slot_N, token_N, row_TK, slots_Ns, rows_Ns, offsets_T = GC.build_rows_torch(expert_idx_TK, num_experts, num_true,
                                                                              counts, key)
    return Permutation(slot_N=slot_N, token_N=token_N, counts_E=counts[:num_experts], row_TK=row_TK,
                       slots_Ns=slots_Ns, rows_Ns=rows_Ns, offsets_T=offsets_T)


def permute(x_TD: torch.Tensor, perm: Permutation, backend: str = "auto") -> torch.Tensor:
    """x_ND[i] = x_TD[token_N[i]] (autograd: the backward sums each token's row gradients)."""
    if _use_triton(backend, x_TD):
        return _triton_kernels().permute(x_TD, _require_rows(perm), perm.num_rows)
    _, rows_Ns, offsets_T = perm.gather_index()
    return GC.GatherPermuteFn.apply(x_TD, perm.token_N, rows_Ns, offsets_T)


def unpermute_combine(y_ND: torch.Tensor, perm: Permutation, weight_TK: torch.Tensor, num_tokens: int,
                      backend: str = "auto") -> torch.Tensor:
    """out_TD[t] = sum over t's true slots s of weight[s] * y_ND[row of s]; tokens with no true slot get 0."""
    if _use_triton(backend, y_ND):
        row_TK = _require_rows(perm)
        if tuple(weight_TK.shape) != tuple(row_TK.shape) or num_tokens != row_TK.shape[0]:
            raise ValueError(f"weight_TK {tuple(weight_TK.shape)} and num_tokens={num_tokens} must match the "
                             f"routing plan the permutation was built from: [T, K] = {tuple(row_TK.shape)}")
        return _triton_kernels().unpermute_combine(y_ND, weight_TK, row_TK)
    if num_tokens != weight_TK.shape[0]:
        raise ValueError(f"num_tokens={num_tokens} does not match weight_TK {tuple(weight_TK.shape)}: pass the "
                         "routing plan's weights of the tokens the permutation was built from")
    slots_Ns, rows_Ns, offsets_T = perm.gather_index()
    return GC.GatherCombineFn.apply(y_ND, weight_TK, perm.token_N, perm.slot_N, slots_Ns, rows_Ns, offsets_T)
