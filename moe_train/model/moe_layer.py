"""One MoE layer: router -> routing plan -> dispatcher (permute, experts, combine) [+ Qwen2 shared expert].

The dispatcher is swappable: LocalDispatcher computes every expert in this process; the expert-parallel
dispatcher (moe_train.parallel) sends rows to the ranks that hold their experts. Both take the same plan and
never touch a null slot. The router and the dispatcher are typed by the protocols of routing/protocols.py.
Shape legend: B batch, S sequence, T = B*S tokens, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.config import ModelConfig
from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.model.experts import GroupedExperts, SwiGLU
from moe_train.routing import Dispatcher, Router, RoutingPlan, build_router
from moe_train.routing.capacity import apply_capacity_from_config
from moe_train.routing.zero_compute import add_null_output


class LocalDispatcher:
    """All experts in this process: permute the true slots, grouped experts, weighted combine."""

    def __init__(self, permute_backend: str = "auto"):
        self.permute_backend = permute_backend

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> torch.Tensor:
        b = self.permute_backend
        perm = build_permutation(plan.expert_idx_TK, experts.num_experts, backend=b)
        y_ND = experts(permute(x_TD, perm, backend=b), perm.counts_E)
        return unpermute_combine(y_ND, perm, plan.weight_TK, x_TD.shape[0], backend=b)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.router: Router = build_router(D, cfg.moe)
        self.experts = GroupedExperts(cfg.moe.num_experts, D, cfg.intermediate_size, cfg.moe.gemm_backend)
        self.shared_expert = SwiGLU(D, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if self.shared_expert is not None else None
        # DeepSeek shared experts: one ungated SwiGLU of width intermediate_size * n_shared_experts (HF's layout)
        self.shared_experts = SwiGLU(D, cfg.intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.moe.permute_backend)  # parallelize_model swaps it
        self.moe_cfg = cfg.moe  # capacity_factor / drop_policy for apply_capacity

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        plan = self.router(x_TD)
        if self.moe_cfg.capacity_factor is not None:  # per-expert capacity on this (rank-local) batch
            plan = apply_capacity_from_config(plan, self.moe_cfg)
        y_TD = self.dispatcher(x_TD, plan, self.experts)
        # identity / constant null picks: on this rank, never dispatched (routing/zero_compute.py)
        y_TD = add_null_output(y_TD, x_TD, plan, getattr(self.router, "null_values", None))
        if self.shared_expert is not None:
            y_TD = y_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.reshape(B, S, D), plan
