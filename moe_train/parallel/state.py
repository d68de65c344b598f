"""Full and checkpoint views of a model that moe_train.parallel.parallelize_model sharded.

Every ep-sharded stacked expert tensor (base weights and LoRA adapters alike) is found through the typed record its
module carries, ``GroupedExperts.ep_shard`` (an ExpertShard: global experts [offset, offset + local) of num_global);
nothing else marks expert-parallel state.

full_state_dict / full_grads gather plain full tensors (stacked experts in global order) for saving, tests and
debugging; checkpoint_view gives DCP the global-shape DTensors it needs to save sharded checkpoints and reshard them
at another world size and ep (moe_train/io/dcp_checkpoint.py).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moe_train.model.experts import ExpertShard, GroupedExperts
from moe_train.parallel.collectives import all_gather
from moe_train.parallel.distributed import ParallelContext


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """Fully qualified name -> shard record of every ep-sharded stacked expert tensor (base weights, LoRA adapters,
    ...); empty without expert parallelism."""
    shards = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts) and mod.ep_shard is not None:
            for n, _ in mod.stacked_parameters():
                shards[f"{mod_name}.{n}" if mod_name else n] = mod.ep_shard
    return shards


def _gather_full(named: Iterable[tuple[str, Optional[torch.Tensor]]], shards: dict[str, ExpertShard],
                 ctx: ParallelContext) -> dict[str, Optional[torch.Tensor]]:
    out = {}
    for name, t in named:  # the same order on every rank: every collective below is matched
        if t is None:
            out[name] = None
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()
        shard = shards.get(name)
        if shard is not None and ctx.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(ctx.ep_size)]
            all_gather(parts, t.contiguous(), group=ctx.ep_group)
            t = torch.cat(parts, 0)  # ep ranks hold consecutive expert blocks (shard.offset = ep_rank * local)
            assert t.shape[0] == shard.num_global, (name, tuple(t.shape), shard)
        out[name] = t.detach()
    return out


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Plain full tensors, keys and shapes as in the unparallelized model (collective: call on every rank)."""
    sd = model.state_dict()
    if not ctx.distributed:
        return {k: v.detach() for k, v in sd.items()}
    return _gather_full(sd.items(), expert_shards(model), ctx)


def full_state_specs(model: nn.Module, ctx: ParallelContext) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (full shape, dtype) of every state-dict entry, as full_state_dict would return them; no communication."""
    shards = expert_shards(model) if ctx.distributed else {}
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)  # a DTensor's shape is its global one over the FSDP mesh
        if name in shards and ctx.ep_size > 1:
            shape = (shards[name].num_global, *shape[1:])
        out[name] = (shape, t.dtype)
    return out


def iter_full_state(model: nn.Module, ctx: ParallelContext) -> Iterator[tuple[str, torch.Tensor]]:
    """full_state_dict one entry at a time (collective: every rank iterates it to the end): a caller that writes each
    tensor and drops it holds one full tensor, never the model."""
    sd = model.state_dict()
    if not ctx.distributed:
        for name, t in sd.items():
            yield name, t.detach()
        return
    shards = expert_shards(model)
    for name, t in sd.items():
        yield name, _gather_full([(name, t)], shards, ctx)[name]


def full_grads(model: nn.Module, ctx: ParallelContext) -> dict[str, Optional[torch.Tensor]]:
    """Full gradients by parameter name (None where a parameter has none); collective, for tests and debugging."""
    named = [(n, p.grad) for n, p in model.named_parameters()]
    if not ctx.distributed:
        return {n: None if g is None else g.detach() for n, g in named}
    return _gather_full(named, expert_shards(model), ctx)


def checkpoint_view(model_sd: dict, optim_sd: dict, model: nn.Module, ctx: ParallelContext) -> tuple[dict, dict]:
    """The state dicts as DCP should see them: every stacked expert tensor (base weights and LoRA adapters, and their
    optimizer moments) as a 2-D DTensor over the (dp, ep) mesh with its GLOBAL shape [E, ...] (E = the record's
    num_global; Shard(1) over dp from FSDP, Shard(0) over ep from the expert split), aliasing the local shard.
    Without this, the ep ranks' different expert blocks would share one name and shape and DCP would keep only one
    of them. Other entries pass through unchanged; a checkpoint saved this way loads at any world size and ep (DCP
    reshards)."""
    if not ctx.distributed or ctx.ep_size == 1:
        return model_sd, optim_sd
    from torch.distributed.tensor import Shard

    shards = expert_shards(model)

    def lift(t, shard: ExpertShard):
        if not isinstance(t, DTensor) or t.dim() == 0:
            return t
        assert t.shape[0] * ctx.ep_size == shard.num_global, (tuple(t.shape), ctx.ep_size, shard)
        shape = (shard.num_global, *t.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t.to_local(), ctx.mesh, [Shard(1), Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    model_view = {k: lift(v, shards[k]) if k in shards else v for k, v in model_sd.items()}
    state = {k: ({n: lift(v, shards[k]) for n, v in s.items()} if k in shards else s)
             for k, s in optim_sd.get("state", {}).items()}
    return model_view, {**optim_sd, "state": state}
