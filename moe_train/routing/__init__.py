"""Routers: each returns a RoutingPlan (expert index per slot, -1 for null/unused; slot weights; counts).

The Router / Dispatcher / Experts protocols (routing/protocols.py) are the MoE layer's interfaces; every router is a
routing/base.py BaseRouter registered by name (routing/registry.py: router_class, build_router).
"""

from moe_train.routing.adak import AdaKRouter
from moe_train.routing.base import BaseRouter, register
from moe_train.routing.null_experts import NullExpertRouter
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.protocols import Dispatcher, Experts, Router
from moe_train.routing.registry import build_router, canonical_router_name, router_class, router_names
from moe_train.routing.top_p import TopPRouter
from moe_train.routing.topk import TopKRouter

__all__ = ["RoutingPlan", "counts_from_idx", "Router", "Dispatcher", "Experts", "BaseRouter", "register",
           "TopKRouter", "NullExpertRouter", "AdaKRouter", "TopPRouter", "build_router", "router_class",
           "router_names", "canonical_router_name"]
