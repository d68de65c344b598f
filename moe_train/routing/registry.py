"""The routers by name: ``router_class(name)`` (aliases resolved), ``build_router(hidden_size, cfg)``.

Each router module registers its class (routing/base.py ``register``); importing them here, in this order, fills
the registry and fixes the order of ``router_names()`` (config.py's ROUTERS). A new router is one module with a
``@register`` class, plus its import line below.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from moe_train.errors import ConfigError
from moe_train.routing import adak, null_experts, top_p, topk  # noqa: F401 - each registers its router class
from moe_train.routing.base import ALIASES, ROUTERS, BaseRouter

if TYPE_CHECKING:
    from moe_train.config import MoEConfig

log = logging.getLogger(__name__)
_warned: set[str] = set()


def router_names() -> tuple[str, ...]:
    """The registered routers' names, in registration order (aliases not included)."""
    return tuple(ROUTERS)


def canonical_router_name(name: str) -> str:
    """``name``, or the router an old alias names (``null`` -> ``null_experts``, logged once as deprecated);
    ConfigError for a name no router has."""
    if name in ROUTERS:
        return name
    if name in ALIASES:
        new = ALIASES[name]
        if name not in _warned:
            _warned.add(name)
            log.info(f"model.moe.router: {name!r} is the old name of router {new!r} (deprecated; write {new!r})")
        return new
    raise ConfigError(f"model.moe.router={name!r} is not allowed: one of {router_names()}")


def router_class(name: str) -> type[BaseRouter]:
    """The class of router ``name`` (an alias resolves to its router)."""
    return ROUTERS[canonical_router_name(name)]


def conversions_on_load() -> str:
    """The router changes train.init_from does on load, in words (each class's converts_from)."""
    return ", ".join(f"{src} -> {name}" for name, cls in ROUTERS.items() for src in cls.converts_from)


def build_router(hidden_size: int, cfg: MoEConfig) -> BaseRouter:
    return router_class(cfg.router)(hidden_size, cfg)
