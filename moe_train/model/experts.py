"""SwiGLU experts stored stacked per layer, computed with one grouped GEMM per projection.

    E_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]
Shape legend: N rows grouped by expert, D hidden, F expert FFN width, E experts held by this module
(all experts in one process; the local shard under expert parallelism).

Contract: every parameter a GroupedExperts module (or a subclass, e.g. LoRA's) owns directly is stacked per expert,
expert on dim 0. Expert parallelism relies on it: it splits, gathers and checkpoints all of them alike
(``stacked_parameters``), so an adapter always travels with its expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.kernels.grouped_gemm import grouped_mm


@dataclass(frozen=True)
class ExpertShard:
    """The block of experts a module holds under expert parallelism (set by moe_train.parallel.shard_experts):
    global experts [offset, offset + module.num_experts) of num_global."""

    num_global: int
    offset: int


class GroupedExperts(nn.Module):
    ep_shard: Optional[ExpertShard] = None  # None: all experts (no expert parallelism)

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))  # [E, D, F]
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))  # [E, D, F]
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))  # [E, F, D]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: rows grouped by expert, counts_E rows each (on device); returns y_ND in the same order."""
        h_NF = F.silu(grouped_mm(x_ND, self.w_gate, counts_E, self.backend)) * grouped_mm(
            x_ND, self.w_up, counts_E, self.backend)
        return grouped_mm(h_NF, self.w_down, counts_E, self.backend)

    def stacked_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every per-expert tensor of this module: all its own parameters (see the contract in
        the module docstring), the base weights and any a subclass adds."""
        params = list(self.named_parameters(recurse=False))
        for name, p in params:
            assert p.dim() >= 1 and p.shape[0] == self.num_experts, (name, tuple(p.shape), self.num_experts)
        return params


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the Qwen2-MoE shared expert); HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
