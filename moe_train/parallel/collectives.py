"""The small collectives a distributed training loop needs; each is a plain local op in a single process.

all_reduce_sum / all_reduce_mean: metrics and buffers (e.g. the aux-loss-free expert_bias, kept identical on every
rank by updating it with counts summed over all ranks). clip_grad_norm_: torch's clipping for a model that
moe_train.parallel.parallelize_model sharded, where every element of every parameter lives on exactly one rank
(non-expert parameters: Shard(0) over the world; experts: Shard(0) over edp x disjoint over ep), so the global norm
takes one all-reduce.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moe_train.parallel.distributed import ParallelContext


def all_reduce_sum(t: torch.Tensor, ctx: ParallelContext, group=None) -> torch.Tensor:
    """Sum over all ranks (or ``group``); returns a new tensor, the input is untouched."""
    out = t.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    out = all_reduce_sum(t.to(torch.float64) if not t.is_floating_point() else t, ctx)
    return out / ctx.world_size


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for the parallelized model: the global L2 norm over all ranks' shards (one
    all-reduce; every element lives on exactly one rank), then every local grad scaled by
    min(1, max_norm / (norm + 1e-6)), as torch does. Returns the total norm (the same on every rank)."""
    params = [p for p in parameters if p.grad is not None]
    if not ctx.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [local_tensor(p.grad) for p in params]
    sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in grads:
        sq += g.float().square().sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
