"""Routers: each returns a RoutingPlan (expert index per slot, -1 for null/unused; slot weights; counts).

The Router / Dispatcher / Experts protocols (routing/protocols.py) are the MoE layer's interfaces.
"""

from moe_train.config import ROUTERS, MoEConfig
from moe_train.routing.adak import AdaKRouter
from moe_train.routing.null_experts import NullExpertRouter
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.protocols import Dispatcher, Experts, Router
from moe_train.routing.top_p import TopPRouter
from moe_train.routing.topk import TopKRouter

# config.ROUTERS, in its order
ROUTER_CLASSES = dict(zip(ROUTERS, (TopKRouter, NullExpertRouter, AdaKRouter, TopPRouter)))


def build_router(hidden_size: int, cfg: MoEConfig) -> Router:
    return ROUTER_CLASSES[cfg.router](hidden_size, cfg)


__all__ = ["RoutingPlan", "counts_from_idx", "Router", "Dispatcher", "Experts", "TopKRouter", "NullExpertRouter",
           "AdaKRouter", "TopPRouter", "build_router"]
