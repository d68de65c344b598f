"""The scale planner (`moe-train plan`): per-GPU memory, bytes, step time and bottleneck of a config on a cluster,
from the real model and parallelisation on the meta device under a fake process group (docs/planner.md).

Imports are lazy: moe_train/cli.py adds the subcommand's parser without loading torch."""

from __future__ import annotations

_EXPORTS = {"Cluster": "moe_train.planner.plan", "make_plan": "moe_train.planner.plan",
            "resolve_cluster": "moe_train.planner.plan", "PlanError": "moe_train.planner.shard"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_train.planner' has no attribute {name!r}")
