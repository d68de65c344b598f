"""The small collectives a distributed training loop needs; each is a plain local op in a single process.

all_reduce_sum / all_reduce_mean: metrics and buffers (e.g. the aux-loss-free expert_bias, kept identical on every
rank by updating it with counts summed over all ranks). clip_grad_norm_: torch's clipping for a model that
moe_train.parallel.parallelize_model sharded, where every element of every parameter lives on exactly one rank
(non-expert parameters: Shard(0) over the world; experts: Shard(0) over edp x disjoint over ep), so the global norm
takes one all-reduce.

Every collective of the package on tensors goes through this module (all_reduce, all_gather, broadcast,
all_to_all_single, all_to_all_start below), which checks that the tensors live where the process group's backend reads them: NCCL
takes CUDA tensors only, gloo (as this project runs it) CPU tensors. A CPU tensor handed to NCCL fails only at the
first distributed step on a GPU machine, while gloo, which every CPU test runs, accepts it; checking here makes
the CPU tests see such a tensor too (a gloo group expecting CUDA, tests/test_collectives.py) and names the
mistake on the GPU. Object collectives (broadcast_object_list, all_gather_object) and barriers move no tensor of
ours and call torch.distributed directly.

The expert-parallel exchanges use ``all_to_all_start`` / ``wait_tensor``: torch's functional collectives
(torch.distributed._functional_collectives, the ``_c10d_functional`` ops), which torch.compile traces into its
graph, unlike dist.all_to_all_single (an in-place call on a ProcessGroup object that Dynamo cannot trace). In eager
the start issues the exchange asynchronously (gloo runs it on its own threads, NCCL on its stream) and the output
tensor is valid only after ``wait_tensor``; between the two the caller computes something else (the shared expert,
another chunk's experts). CommTimer (when active) adds the host time spent issuing and waiting, in eager only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor import DTensor

from moe_train.parallel.distributed import ParallelContext

# The device type each backend's collectives read and write. Backends not named here (fake: the planner's
# meta-device tracing; mpi, ucc) are not checked. A device-keyed backend string ("cpu:gloo,cuda:nccl") names its
# own devices. Tests replace entries (e.g. gloo -> cuda) to see what an NCCL run would refuse.
BACKEND_DEVICE: dict[str, str] = {"nccl": "cuda", "gloo": "cpu"}


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its process group's backend cannot read (a bug in the caller, not a
    configuration mistake: the tensor must be built on ParallelContext.device / the group's device)."""


def group_device_types(group=None) -> Optional[frozenset[str]]:
    """The device types a collective on ``group`` (default: the world) accepts; None when any is fine."""
    backend = str(dist.get_backend(group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl": torch routes each device type to its own backend
        return frozenset(part.split(":", 1)[0] for part in backend.split(","))
    dev = BACKEND_DEVICE.get(backend)
    return None if dev is None else frozenset((dev,))


def check_device(op: str, group, *tensors: torch.Tensor) -> None:
    """Raises CollectiveDeviceError unless every tensor is on a device ``group``'s backend accepts."""
    types = group_device_types(group)
    if types is None:
        return
    for t in tensors:
        if t.device.type not in types:
            raise CollectiveDeviceError(
                f"{op} over a {dist.get_backend(group)} process group got a {t.device.type} tensor "
                f"(shape {tuple(t.shape)}, {t.dtype}); this backend takes {'/'.join(sorted(types))} tensors only. "
                f"Build it on the group's device (ParallelContext.device) before the collective")


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    """torch.distributed.all_reduce, in place, after the device check."""
    check_device("all_reduce", group, t)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def all_gather(parts: list[torch.Tensor], t: torch.Tensor, group=None, async_op: bool = False):
    """torch.distributed.all_gather into ``parts`` (one per rank), after the device check."""
    check_device("all_gather", group, t, *parts)
    return dist.all_gather(parts, t, group=group, async_op=async_op)


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    """torch.distributed.broadcast from global rank ``src``, in place, after the device check."""
    check_device("broadcast", group, t)
    return dist.broadcast(t, src=src, group=group, async_op=async_op)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, out_splits: Optional[list[int]] = None,
                      in_splits: Optional[list[int]] = None, group=None, async_op: bool = False):
    """torch.distributed.all_to_all_single (uneven splits as Python ints, which need no device tensor), after the
    device check."""
    check_device("all_to_all_single", group, out, inp)
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


class CommTimer:
    """Host seconds spent issuing and waiting on the all-to-all exchanges (all_to_all_start / wait_tensor) while
    active, forward and backward: on gloo the communication the computation did not hide (on NCCL the wait only
    orders streams: use a profiler there). Eager only (a compiled graph has no host hooks)."""

    active: Optional["CommTimer"] = None

    def __init__(self):
        self.seconds = 0.0

    @classmethod
    @contextmanager
    def measure(cls):
        timer = cls.active = cls()
        try:
            yield timer
        finally:
            cls.active = None

    @classmethod
    @contextmanager
    def span(cls):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cls.active is not None:
                cls.active.seconds += time.perf_counter() - t0


def all_to_all_start(inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Issues the functional all_to_all_single of ``inp`` along dim 0 (uneven splits as Python ints: rows to each
    rank, rows from each rank) over ``group`` (default: the world) and returns its output, which is filled only once
    ``wait_tensor`` ran on it. No autograd here (exchange.py pairs start and wait into autograd functions)."""
    group = dist.group.WORLD if group is None else group
    inp = inp.contiguous()
    if torch.compiler.is_compiling():  # traced: the op goes into the graph; device and timer are eager concerns
        return torch.ops._c10d_functional.all_to_all_single(inp, out_splits, in_splits, group.group_name)
    check_device("all_to_all_single", group, inp)
    with CommTimer.span():
        return torch.ops._c10d_functional.all_to_all_single(inp, out_splits, in_splits, group.group_name)


def wait_tensor(t: torch.Tensor) -> torch.Tensor:
    """Waits for the collective that produces ``t`` (all_to_all_start) and returns it, now valid."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(t)
    with CommTimer.span():
        return funcol.wait_tensor(t)


def all_reduce_sum(t: torch.Tensor, ctx: ParallelContext, group=None) -> torch.Tensor:
    """Sum over all ranks (or ``group``); returns a new tensor, the input is untouched."""
    out = t.detach().clone()
    if ctx.distributed:
        all_reduce(out, op=dist.ReduceOp.SUM, group=group)
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
    all_reduce(sq, op=dist.ReduceOp.SUM)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
