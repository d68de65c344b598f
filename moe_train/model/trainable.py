"""Which parameters train: LoRA and train.trainable's patterns for the trainer, the frozen base with fp32 allocators
for Ada-K. Model-level functions (the trainers, the planner and conversion call them on a built model, also on the
meta device), so they live below train/ and planner/."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from moe_train.config import Config
from moe_train.model.decoder import MoETransformer
from moe_train.model.lora import apply_lora
from moe_train.routing.adak import AdaKRouter


def apply_trainable(model: torch.nn.Module, cfg: Config) -> None:
    """LoRA (if configured), then freeze every parameter whose name matches none of train.trainable."""
    t = cfg.train
    if t.lora_rank:
        apply_lora(model, t.lora_rank, t.lora_alpha, tuple(t.lora_targets))
    if t.trainable:
        patterns = [re.compile(p) for p in t.trainable]
        for name, p in model.named_parameters():
            p.requires_grad_(any(pt.search(name) for pt in patterns))


def adak_routers(model: MoETransformer) -> list[AdaKRouter]:
    routers = model.routers()
    if not all(r.learns_k for r in routers):  # Ada-K's allocators (routing/base.py class facts)
        raise ValueError(f"the model's router is {model.config.moe.router!r}, not an Ada-K router: convert a top-k "
                         "model with moe_train.io.adak_convert.add_allocators (moe-train adak does it)")
    return routers


def allocators_to_fp32(routers: Sequence[AdaKRouter]) -> None:
    """The allocators as fp32 master weights, in place (the Parameter objects stay; exact from bf16)."""
    for r in routers:
        r.allocator.float()


def freeze_base(model: MoETransformer) -> list[nn.Parameter]:
    """requires_grad False on every parameter except the allocators, which become fp32 master weights (module
    docstring: precision); returns the allocator weights. Call before building the optimizer."""
    routers = adak_routers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    allocators_to_fp32(routers)
    params = [r.allocator.weight for r in routers]
    for p in params:
        p.requires_grad_(True)
    return params
