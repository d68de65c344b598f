"""The training engines by name: parallel.engine -> its Engine class (the interface: train/engine.py).

The one place that maps a config's engine to code; callers ask the class for its facts and its model preparation
and get a run's engine from ``build_engine``, never compare engine names. A new engine is one module with a subclass
of Engine, one line in ENGINE_CLASSES and its row in config.ENGINE_FACTS (tests/test_engine_registry.py checks that
the three agree).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from moe_train.config import ENGINES, Config
from moe_train.parallel.distributed import ParallelContext
from moe_train.train.deepspeed_engine import DeepSpeedEngine
from moe_train.train.engine import Engine, TorchEngine

ENGINE_CLASSES: dict[str, type[Engine]] = {cls.name: cls for cls in (TorchEngine, DeepSpeedEngine)}


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass of parallel.engine ``name``."""
    if name not in ENGINE_CLASSES:
        raise ValueError(f"parallel.engine={name!r} must be one of {ENGINES}")
    return ENGINE_CLASSES[name]


def build_engine(cfg: Config, ctx: ParallelContext, model: nn.Module, opt: torch.optim.Optimizer, *, bf16: bool,
                 sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 params: Optional[Sequence[nn.Parameter]] = None, accum: int = 1) -> Engine:
    """The engine of a run of ``cfg`` (parallel.engine) over the model its class prepared (Engine.prepare_model)
    and ``opt`` (groups from Engine.split_param_groups), stepping ``sched`` with it; see Engine.create."""
    return engine_class(cfg.parallel.engine).create(model, opt, cfg, ctx, bf16=bf16, sched=sched, params=params,
                                                    accum=accum)
