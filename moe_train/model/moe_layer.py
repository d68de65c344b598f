"""One MoE layer: router -> routing plan -> dispatcher (permute, experts, combine) [+ shared expert, null term].

The dispatcher is swappable: LocalDispatcher computes every expert in this process; the expert-parallel
dispatcher (moe_train.parallel) sends rows to the ranks that hold their experts. Both take the same plan and
never touch a null slot. The router and the dispatcher are typed by the protocols of routing/protocols.py.
Every dispatcher runs in phases (as Megatron-Core's route -> dispatch -> experts -> combine; the Dispatcher protocol
of routing/protocols.py): the layer runs the shared expert(s) while the dispatch exchange is in flight and the
identity / constant null term while the combine exchange is, so neither waits for the all-to-all
(parallel/dispatcher.py); LocalDispatcher's phases exchange nothing. The terms are added
in one fixed order whatever the dispatcher: routed + null + gated shared + DeepSeek shared.
Shape legend: B batch, S sequence, T = B*S tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from moe_train.config import ModelConfig
from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.model.experts import GroupedExperts, SwiGLU
from moe_train.routing import Dispatcher, Router, RoutingPlan, build_router
from moe_train.routing.capacity import apply_capacity_from_config
from moe_train.routing.zero_compute import null_expert_output


@dataclass
class LocalState:
    """What LocalDispatcher's phases pass on: the tokens and plan, then the expert rows' outputs."""

    x_TD: torch.Tensor
    plan: RoutingPlan
    perm: Any = None
    y_ND: Optional[torch.Tensor] = None


class LocalDispatcher:
    """All experts in this process: permute the true slots, grouped experts, weighted combine. Its phases
    (dispatch / run_experts / combine) exchange nothing: the permutation, the experts and the combine run in
    run_experts and combine."""

    def __init__(self, permute_backend: str = "auto"):
        self.permute_backend = permute_backend

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> LocalState:
        return LocalState(x_TD, plan)

    def run_experts(self, st: LocalState, experts: GroupedExperts) -> LocalState:
        b = self.permute_backend
        perm = self.permutation(st.plan, experts.num_experts)
        y_ND = experts(permute(st.x_TD, perm, backend=b), perm.counts_E)
        return LocalState(st.x_TD, st.plan, perm, y_ND)

    def combine(self, st: LocalState) -> torch.Tensor:
        return unpermute_combine(st.y_ND, st.perm, st.plan.weight_TK, st.x_TD.shape[0], backend=self.permute_backend)

    def permutation(self, plan: RoutingPlan, num_experts: int):
        return build_permutation(plan.expert_idx_TK, num_experts, backend=self.permute_backend)

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: GroupedExperts) -> torch.Tensor:
        return self.combine(self.run_experts(self.dispatch(x_TD, plan), experts))


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
        d = self.dispatcher
        state = d.dispatch(x_TD, plan)  # the rows are in flight ...
        shared_TD = self._shared_output(x_TD)  # ... while the shared experts compute
        state = d.run_experts(state, self.experts)  # the expert outputs travel back ...
        null_TD = self._null_output(x_TD, plan)  # ... while the null term computes
        y_TD = d.combine(state)
        if null_TD is not None:
            y_TD = y_TD + null_TD.to(y_TD.dtype)
        for s_TD in shared_TD:
            y_TD = y_TD + s_TD
        return y_TD.reshape(B, S, D), plan

    def _null_output(self, x_TD: torch.Tensor, plan: RoutingPlan) -> Optional[torch.Tensor]:
        """The identity / constant null picks' term, on this rank (routing/zero_compute.py); None for none."""
        if plan.null_weight_TK is None:
            return None
        return null_expert_output(x_TD, plan.null_idx_TK, plan.null_weight_TK, plan.null_kind,
                                  self.router.null_values)  # Router protocol: None but for constant null experts

    def _shared_output(self, x_TD: torch.Tensor) -> list[torch.Tensor]:
        """The Qwen2 gated shared expert's and the DeepSeek shared experts' outputs, in the order they are added."""
        out = []
        if self.shared_expert is not None:
            out.append(torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD))
        if self.shared_experts is not None:
            out.append(self.shared_experts(x_TD))
        return out
