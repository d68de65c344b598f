"""The two interfaces of an MoE layer, as structural types (typing.Protocol): what a router and a dispatcher are.

    Router:     x_TD -> RoutingPlan                       (routing/: every BaseRouter subclass, registry.py)
    Dispatcher: (x_TD, plan, experts) -> y_TD             (model/moe_layer.py: LocalDispatcher;
                                                           parallel/dispatcher.py: AllToAllDispatcher)
    Experts:    (x_ND rows grouped by expert, counts_E) -> y_ND   (model/experts.py: GroupedExperts)

model/moe_layer.py::MoELayer holds one of each; the Megatron adapter (parallel/megatron) runs a Router under
Megatron's router interface. Here, beside RoutingPlan, so every layer of the package can name them without importing
the model.
Shape legend: T tokens, D hidden, N rows (true assignments), E experts held by the module.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch

from moe_train.routing.plan import RoutingPlan


@runtime_checkable
class Router(Protocol):
    """Scores the tokens and returns the layer's routing decision; null and unused slots are -1 in the plan.

    Everything a caller may use of a router (routing/base.py BaseRouter gives the no-op defaults): the MoE layer's
    combine reads ``null_values`` (constant null experts' vectors [Z, D], else None); the trainer calls
    ``update_bias`` and ``update_budget`` on every router after an optimizer step. What a KIND of router is (its
    slots, checks, kernel, export) is asked of its class: routing/registry.py router_class(name)."""

    name: str
    num_experts: int
    learns_k: bool  # an allocator picks each token's k (Ada-K: set_mode; eval forces k, the PPO trainer samples)
    null_values: Optional[torch.Tensor]

    def __call__(self, x_TD: torch.Tensor) -> RoutingPlan: ...

    def update_bias(self, counts_E: torch.Tensor) -> None: ...

    def update_budget(self, true_experts_per_token: float) -> None: ...


@runtime_checkable
class Experts(Protocol):
    """Stacked experts: rows grouped by expert (counts_E rows each, in expert order) in, their outputs out."""

    num_experts: int

    def __call__(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Dispatcher(Protocol):
    """Runs the plan's TRUE slots through the experts and combines them with the plan's weights into y_TD; a null
    slot is never copied, sent or computed. In phases, split at its exchanges (MoELayer computes the shared expert
    and the null term between them): ``dispatch`` issues the rows' exchange (not waited) and returns the state the
    next phases take; ``run_experts`` waits, computes, issues the way back and returns the state ``combine`` takes (by value: no
    phase mutates the state another returned); ``combine`` waits and returns y_TD.
    ``__call__`` runs the three."""

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> Any: ...

    def run_experts(self, state: Any, experts: Experts) -> Any: ...

    def combine(self, state: Any) -> torch.Tensor: ...

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts) -> torch.Tensor: ...
