"""A job's model, materialised rank by rank (torchtitan's order): no rank ever holds the whole model.

    1. build on the meta device: the source's architecture when train.init_from names a checkpoint (its routers
       alone are read for real: they are small, and the conversions on load need their values), else the config's
    2. conversion on load (AdaMoE null experts, top-p, Ada-K allocators) on those real routers, by the same
       functions as for a whole model (io/convert.py, io/adak_convert.py); the converted routers are kept aside
    3. LoRA and freezing (model/trainable.py); frozen weights in the compute dtype (bf16: no fp32 master for a
       weight that never updates); Ada-K: the frozen base in adak.dtype, fp32 allocators
    4. parallelism on the meta model: expert shards + FSDP2 per decoder block (parallel/parallelize.py)
    5. ``to_empty`` on the device: each rank allocates its own shards only
    6. fill each local shard: from the source (a Hugging Face folder or a model.pt, io/sources.py: a rank reads
       only its own experts, one tensor at a time), from the converted routers, or fresh (model/init.py: one
       generator per tensor, so the same seed gives the same model at any world size and ep)

Steps 4 and 6's expert block are the engine's (train/engine.py: prepare_meta_model, expert_block): the FSDP2 engine
shards here; DeepSpeed builds its engine around a whole module (deepspeed.initialize; ZeRO-3 partitions after), so
under parallel.engine: deepspeed each rank materialises the whole model (step 4 only checks that it fits) and
DeepSpeed shards it.
Shape legend: E experts (global), El experts of one rank.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from contextlib import ExitStack
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_train.config import Config, ModelConfig
from moe_train.io.adak_convert import add_allocators
from moe_train.io.convert import add_null_experts
from moe_train.io.sources import StateSource, meta_model_with_routers, open_source
from moe_train.model import MoETransformer, build_model
from moe_train.model.init import initial_value
from moe_train.model.rope import rotary_for
from moe_train.model.trainable import apply_trainable, freeze_base
from moe_train.parallel.compile import apply_compile
from moe_train.parallel.distributed import ParallelContext
from moe_train.routing.adak import AdaKRouter
from moe_train.routing.registry import conversions_on_load, router_class
from moe_train.train.engine_registry import engine_class

logger = logging.getLogger(__name__)

# MoE settings that are training choices, not architecture: always taken from the config, also with init_from.
MOE_TRAINING_KNOBS = ("aux_loss_coef", "z_loss_coef", "expert_bias_rate", "target_true_experts", "budget_kp",
                      "budget_ki", "capacity_factor", "drop_policy", "gemm_backend", "permute_backend", "top_p",
                      "entropy_loss_coef", "routing_backend")
ROUTER_STATE = ("expert_bias", "null_bias", "null_bias_integral")  # may start at 0 when a config switches it on
_ROUTER = re.compile(r"(layers\.\d+\.moe\.router\.)(.*)")


# ----------------------------------------------------------------------------------------------------------
# conversion on load: the target architecture, and the converted routers' values


def convert_for_training(loaded: MoETransformer, cfg: Config, src: str) -> ModelConfig:
    """Converts ``loaded`` (a whole model, or a meta one whose routers are real) in place as train.init_from asks
    (AdaMoE null experts, or top-p routing over the same gate); returns the ModelConfig to train: the loaded
    architecture with this config's training knobs."""
    want, have = cfg.model.moe, loaded.config.moe
    target = router_class(want.router)
    converted = want.router != have.router
    if converted and have.router not in target.converts_from:
        raise ValueError(f"model.moe.router={want.router!r} but train.init_from={src!r} holds a {have.router!r} "
                         f"model; only {conversions_on_load()} are done on load")
    if converted and target.ranks_null_experts:  # top-k -> null experts: the AdaMoE conversion
        add_null_experts(loaded, want.num_null_experts, want.top_k, want.baseline_top_k, want.null_tie_break,
                         want.null_kind)
    elif converted:  # top-k -> top_p: the same gate; top-p selection over its probabilities
        if loaded.config.moe.expert_bias_rate > 0 or loaded.config.moe.use_expert_bias:
            raise ValueError(f"train.init_from={src!r} routes with a selection bias (expert bias): the top-p router "
                             "selects by probability mass only and cannot continue it")
    knobs = {k: getattr(want, k) for k in MOE_TRAINING_KNOBS}
    if converted and not target.ranks_null_experts:
        # the gate convention is the target's: top_p_renormalize: true keeps a norm_topk_prob top-k model's gates
        knobs.update(router=want.router, k_max=want.k_max, top_p_renormalize=want.top_p_renormalize)
    return dataclasses.replace(loaded.config, moe=dataclasses.replace(loaded.config.moe, **knobs))


def convert_for_adak(loaded: MoETransformer, cfg: Config, src: str) -> ModelConfig:
    """The base model of an Ada-K job, converted to Ada-K with adak.k_min / adak.k_max when it is top-k or null."""
    moe = loaded.config.moe
    if router_class(moe.router).learns_k:  # already Ada-K: its action range must be the one asked
        k_max = moe.pickable_experts if cfg.adak.k_max is None else cfg.adak.k_max
        if (moe.k_min, moe.resolved_k_max) != (cfg.adak.k_min, k_max):
            raise ValueError(f"train.init_from={src!r} is an Ada-K model with k in [{moe.k_min}, {moe.resolved_k_max}]"
                             f" but adak.k_min/k_max ask for [{cfg.adak.k_min}, {k_max}]; make them agree")
        return loaded.config
    # zero fp32 allocators (a uniform policy); refuses a base Ada-K cannot convert, naming why (io/adak_convert.py)
    add_allocators(loaded, cfg.adak.k_min, cfg.adak.k_max)
    return loaded.config


# ----------------------------------------------------------------------------------------------------------
# filling the local shards


def _local_block(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (the tensor's global value, or its ep block of experts) that ``t`` holds on this rank."""
    if not isinstance(t, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(full.shape, t.device_mesh, t.placements)
    for dim, (n, o) in enumerate(zip(shape, offset)):
        full = full.narrow(dim, o, n)
    return full


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod) if mod else model), leaf


@torch.no_grad()
def fill_local_shards(model: MoETransformer, cfg: ModelConfig, seed: int, source: Optional[StateSource],
                      routers: dict[str, torch.Tensor]) -> None:
    """Every parameter and persistent buffer's local shard of a model fresh from ``to_empty``: the converted
    ``routers`` values (our name -> full tensor) first, then ``source`` (names it has; the rest of a loaded model,
    LoRA adapters and router state that a config switches on, start at their initial values), else fresh."""
    std = cfg.init_std
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict())
    tensors.update((n, b) for n, b in model.named_buffers() if n in persistent)
    for name, t in tensors.items():
        module, leaf = _owner(model, name)
        shard = getattr(module, "ep_shard", None)  # a stacked expert tensor of an ep-sharded GroupedExperts
        experts = None if shard is None else (shard.offset, shard.offset + module.num_experts)
        global_shape = tuple(t.shape) if shard is None else (shard.num_global, *t.shape[1:])
        source_name = name.replace(".base.", ".")  # LoRA wraps a Linear: its weight is the source's
        if name in routers:
            full = routers[name]
        elif source is not None and source_name in source.specs:
            full = source.get(source_name, experts if shard is not None else None)
        else:
            full = initial_value(module, leaf, global_shape, name, seed, std, experts)
        local = t.to_local() if isinstance(t, DTensor) else t
        local.copy_(_local_block(t, full))
    model.rotary = rotary_for(cfg).to(next(iter(tensors.values())).device)  # non-persistent: recomputed


# ----------------------------------------------------------------------------------------------------------
# the whole sequence


def build_job_model(cfg: Config, ctx: Optional[ParallelContext] = None, *, adak: bool = False,
                    base_dtype: Optional[torch.dtype] = None) -> MoETransformer:
    """The model of a train (or, ``adak``, an Ada-K) job on ``ctx`` (None: one process on the CPU), each rank holding
    only its shards, filled; see the module docstring. Call after torch.manual_seed(train.seed): the fresh tensors'
    generators derive from one draw of the global generator. ``base_dtype``: Ada-K's frozen base dtype (None keeps
    fp32 on a fresh / converted model)."""
    device = ctx.device if ctx is not None else torch.device("cpu")
    src = cfg.train.init_from
    engine = engine_class(cfg.parallel.engine)
    distributed = ctx is not None and ctx.distributed
    with ExitStack() as stack:
        source, routers = None, {}
        if src is None:
            if adak:
                raise ValueError("Ada-K trains allocators on a pretrained model: set train.init_from to a moe_train "
                                 "checkpoint (model.pt) or a Hugging Face folder")
            model_cfg = cfg.model
        else:
            source = open_source(src, stack)
            # the experts this rank will hold (None: all); a Hugging Face folder reads those only
            source.experts = engine.expert_block(source.config.moe.num_experts, ctx) if distributed else None
            loaded = meta_model_with_routers(source)
            model_cfg = (convert_for_adak if adak else convert_for_training)(loaded, cfg, src)
            routers = {f"layers.{i}.moe.router.{rel}": t.detach().clone()
                       for i, layer in enumerate(loaded.layers) if layer.moe is not None
                       for rel, t in layer.moe.router.state_dict().items()}
        with torch.device("meta"):
            model = build_model(model_cfg)
        seed = model.init_seed
        _check_router_state(model, routers, src)
        if adak:
            freeze_base(model)
        else:
            apply_trainable(model, cfg)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        _frozen_to(model, base_dtype if adak else _compute_dtype(cfg, device))
        apply_compile(model, cfg.train, device)  # train.compile: after the AC flag, before FSDP2 (torchtitan's order)
        if distributed:  # the engine's sharding (or checks) before each rank allocates
            bf16 = _compute_dtype(cfg, device) == torch.bfloat16 and not adak
            engine.prepare_meta_model(model, ctx, torch.bfloat16 if bf16 else None)
        model.to_empty(device=device)
        fill_local_shards(model, model_cfg, seed, source, routers)
    return model


def _check_router_state(model: MoETransformer, routers: dict[str, torch.Tensor], src: Optional[str]) -> None:
    """The converted routers' tensors fit the model to train; what the model has beyond them is router state that
    this config switches on (it starts at 0), anything else is a mismatch."""
    if not routers:
        return
    want = {n for n in model.state_dict() if _ROUTER.match(n)}
    extra = set(routers) - want
    missing = {n for n in want - set(routers) if not n.endswith(ROUTER_STATE)}
    assert not extra and not missing, (src, sorted(extra), sorted(missing))
    for name in set(routers) & want:
        routers[name] = routers[name].to(model.state_dict()[name].dtype)


def _compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def _frozen_to(model: nn.Module, dtype: Optional[torch.dtype]) -> None:
    """Parameters that do not train, stored in ``dtype`` (the compute dtype: bf16 needs no fp32 master for a weight
    that never updates, and no optimizer state exists for it); trainable ones keep their fp32 masters. Ada-K's
    allocators are fp32 masters whatever the base dtype."""
    if dtype is None or dtype == torch.float32:
        return
    for module in model.modules():
        for leaf, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and not (isinstance(module, nn.Linear) and _is_allocator(model, module)):
                setattr(module, leaf, nn.Parameter(p.detach().to(dtype), requires_grad=False))


def _is_allocator(model: nn.Module, linear: nn.Module) -> bool:
    return any(isinstance(r, AdaKRouter) and r.allocator is linear for r in model.modules())
