"""SwiGLU experts stored stacked per layer, computed with one grouped GEMM per projection.

    E_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]
Shape legend: N rows grouped by expert, D hidden, F expert FFN width, E experts held by this module
(all experts in one process; the local shard under expert parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.kernels.grouped_gemm import grouped_mm


class GroupedExperts(nn.Module):
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


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the Qwen2-MoE shared expert); HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
