"""Initial values, one tensor at a time and independent of how the model is sharded.

A model built on the meta device is materialised rank by rank (train/build.py): each rank fills only its own
shards. For the same seed to give the same model at any world size and ep, a tensor's values cannot come from one
global random stream (whose position depends on what was drawn before); each tensor draws from its own generator,
seeded by (base seed, its name), and a stacked expert tensor by (base seed, its name, the expert's global index), so
a rank draws its own experts only. The distributions are MoETransformer.reset_parameters' and the modules'
constructors':

    nn.Linear / nn.Embedding weight   N(0, init_std)            (attention, dense MLPs, routers' gates, allocators)
    bias                              0
    RMSNorm weight                    1
    stacked experts w_*               N(0, init_std) per expert
    LoRA A (Linear) / A (experts)     kaiming-uniform(a=sqrt 5) / N(0, 1/sqrt(in)) per expert;  LoRA B  0
    null_values (constant nulls)      0
    persistent buffers (router state: expert / null biases, budget integrals)   0

reset_parameters itself calls this module, so a model built whole (build_model) and one materialised shard by shard
hold the same values.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
from torch import nn

from moe_train.model.experts import GroupedExperts
from moe_train.model.lora import LoRAGroupedExperts, LoRALinear
from moe_train.model.norm import RMSNorm


def base_seed() -> int:
    """The seed every tensor's generator derives from: one draw of the global generator (torch.manual_seed(train.seed)
    before the build makes it reproducible)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def _generator(seed: int, *key) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode())) % 2**63)
    return g


def _draw(kind: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape, generator=gen) * std
    if kind == "kaiming":  # nn.init.kaiming_uniform_(a=sqrt(5)) on a [out, in] weight: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(shape[1]) if len(shape) > 1 and shape[1] else 0.0
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    assert kind in ("zeros", "ones"), kind
    return torch.zeros(shape) if kind == "zeros" else torch.ones(shape)


def init_rule(module: nn.Module, leaf: str) -> tuple[str, Optional[float]]:
    """(kind, std) of ``module``'s parameter or buffer ``leaf``; std None: per expert, from the tensor's shape."""
    if isinstance(module, LoRALinear):
        return ("kaiming", None) if leaf == "lora_A" else ("zeros", None)
    if isinstance(module, LoRAGroupedExperts) and leaf.startswith("lora_"):
        return ("expert_normal_in", None) if leaf.endswith("_A") else ("zeros", None)
    if isinstance(module, GroupedExperts):
        return "expert_normal", None
    if isinstance(module, RMSNorm):
        return "ones", None
    if isinstance(module, (nn.Linear, nn.Embedding)) and leaf == "weight":
        return "normal", None
    return "zeros", None  # biases, null_values, router state buffers


def initial_value(module: nn.Module, leaf: str, shape: tuple[int, ...], name: str, seed: int, std: float,
                  experts: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The initial fp32 value of ``module.<leaf>`` (full name ``name``, GLOBAL shape ``shape``); for a stacked expert
    tensor, ``experts=(lo, hi)`` returns those experts only."""
    kind, _ = init_rule(module, leaf)
    if kind in ("expert_normal", "expert_normal_in"):
        lo, hi = experts or (0, shape[0])
        rows = []
        for e in range(lo, hi):
            s = std if kind == "expert_normal" else 1.0 / math.sqrt(shape[1])
            rows.append(_draw("normal", tuple(shape[1:]), s, _generator(seed, name, e)))
        return torch.stack(rows) if rows else torch.empty((0, *shape[1:]))
    value = _draw(kind, tuple(shape), std, _generator(seed, name))
    if experts is not None:  # a per-expert tensor drawn whole (zeros): its rows
        value = value[experts[0]:experts[1]]
    return value


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float) -> None:
    """Every parameter and persistent buffer of a materialised, unsharded ``model`` at its initial value (a tensor
    shared by two modules, a tied head, takes the value of its first name, as named_parameters lists it)."""
    seen = set()
    for mod_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False)
            if b is not None and n not in module._non_persistent_buffers_set]
        for leaf, t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            t.copy_(initial_value(module, leaf, tuple(t.shape), name, seed, std))
