"""Per-rank parameter bytes read off the REAL parallelisation of the real-size model, without any real memory.

The job's model is built on the meta device (shapes and dtypes, no storage), prepared as the trainer prepares it
(LoRA, freezing, Ada-K allocators and base dtype), and handed to parallel/parallelize.py's ``parallelize_model``
under torch's fake process group of the real world size (``FakeStore`` + backend "fake": collectives are no-ops,
so one process plays one rank of a 16- or 64-rank mesh). Then every FSDP2 unit's parameters are read: the padded
shard each rank stores, the unsharded size an all-gather materialises in the compute dtype, which parameters
train. Nothing is estimated here: a new family, a LoRA target or a sharding change shows up by itself.

Units (parallel/parallelize.py _apply_fsdp), read off the modules, never assumed: one per decoder block (its
non-expert parameters, over all ranks; every block but the last reshards after forward), one per MoE layer's experts
nested inside it (mesh "dp" = the expert-data-parallel group), the embedding, [norm, lm_head] (kept gathered from the
forward to its backward), and the root (whatever is left: nothing, or with tied embeddings the embedding + head). A
single process (world 1) has no FSDP: one pseudo-unit, unsharded.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import Config
from moe_train.io.hf_common import read_hf_config
from moe_train.io.hf_config import config_from_hf
from moe_train.model.experts import GroupedExperts
from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.parallelize import parallelize_model


class PlanError(ValueError):
    """A plan cannot be made for this input (the message names what and how to fix it)."""


@dataclass
class UnitBytes:
    """One FSDP2 unit on one rank (bytes)."""

    name: str  # "root", "layers.<i>", "layers.<i>.moe.experts", "embed_tokens", "norm+lm_head"
    kind: str  # "root" | "block" | "experts" | "other" (embedding, head) | "model" (world 1)
    mesh_size: int  # ranks the unit is sharded over
    # gathered from its forward until its backward (the root, the last block, the head): one all-gather per
    # micro-batch instead of two, and its parameters stay in memory through the start of the backward
    kept_after_forward: bool = False
    sharded: int = 0  # padded local shards, storage dtype (what the rank keeps)
    sharded_trainable: int = 0  # of which trainable (their gradients and optimizer moments have this size)
    sharded_trainable_numel: int = 0
    unsharded: int = 0  # the all-gathered parameters in the compute dtype (param_dtype) while the unit runs
    unsharded_trainable: int = 0  # unsharded gradients (compute dtype) before the reduce-scatter
    unsharded_trainable_reduce: int = 0  # the reduce-scatter input in the reduce dtype (fp32 here)
    numel: int = 0  # full (unsharded) parameter count of the unit
    param_ids: set = field(default_factory=set, repr=False)  # id() of the unit's (sharded) parameters


@dataclass
class ShardReport:
    world_size: int
    ep: int
    units: list[UnitBytes] = field(default_factory=list)
    buffers: int = 0  # unsharded buffers (rotary table, routing state)
    storage_dtypes: list[str] = field(default_factory=list)
    compute_dtype: str = "float32"
    param_numel: int = 0  # the whole model's parameters (all ranks)
    trainable_numel: int = 0

    def total(self, attr: str, kind: str | None = None) -> int:
        return sum(getattr(u, attr) for u in self.units if kind is None or u.kind == kind)


def fake_context(world: int, ep: int, rank: int = 0):
    """A ParallelContext for ``rank`` of ``world`` over the fake backend, built as parallel/distributed.py's
    init_distributed builds the real one (same mesh dims and groups). Call inside ``fake_process_group``."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu", mesh_dim_names=("world",))
    dp_idx, ep_idx = mesh.get_coordinate()
    return ParallelContext(world_size=world, rank=rank, local_rank=rank, dp_size=world, dp_rank=rank, ep_size=ep,
                           ep_rank=ep_idx, device=torch.device("meta"), mesh=mesh, ep_group=mesh.get_group("ep"),
                           edp_group=mesh.get_group("dp"), edp_size=world // ep, edp_rank=dp_idx,
                           world_mesh=world_mesh, backend="fake")


@contextmanager
def fake_process_group(world: int, rank: int = 0) -> Iterator[None]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("the planner needs its own (fake) process group, but one is already initialised in this "
                        "process: run `moe-train plan` outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _unit_kind(module: nn.Module, model: nn.Module) -> str:
    if module is model:
        return "root"
    if isinstance(module, GroupedExperts):
        return "experts"
    if any(module is block for block in getattr(model, "layers", [])):
        return "block"
    return "other"


def _units_fsdp(model: nn.Module) -> list[UnitBytes]:
    from torch.distributed.fsdp import FSDPModule

    # one FSDP state per unit; a unit over several modules ([norm, lm_head]) is reached from each of them
    states: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            states.setdefault(id(module._get_fsdp_state()), []).append(module)  # noqa: SLF001
    names = {m: n for n, m in model.named_modules()}
    units = []
    for modules in states.values():
        group = modules[0]._get_fsdp_state()._fsdp_param_group  # noqa: SLF001 - the sharded parameters themselves
        if group is None:  # e.g. the root when every parameter sits in a unit below it
            continue
        unit = UnitBytes(name="+".join(names[m] for m in modules) or "root", kind=_unit_kind(modules[0], model),
                         mesh_size=group.mesh_info.mesh.size(),
                         kept_after_forward=modules[0] is model or group.post_forward_mesh_info is None)
        mp = group.mp_policy  # FSDPParam's own dtype attributes are set only at the first forward
        for fp in group.fsdp_params:
            storage = fp.sharded_param.dtype
            compute = mp.param_dtype or storage
            numel = fp._orig_size.numel()  # noqa: SLF001
            shard_numel = fp.padded_sharded_param_size.numel()
            unit.numel += numel
            unit.param_ids.add(id(fp.sharded_param))
            unit.sharded += shard_numel * storage.itemsize
            unit.unsharded += numel * compute.itemsize
            if fp.sharded_param.requires_grad:
                unit.sharded_trainable += shard_numel * storage.itemsize
                unit.sharded_trainable_numel += shard_numel
                unit.unsharded_trainable += numel * compute.itemsize
                unit.unsharded_trainable_reduce += numel * (mp.reduce_dtype or mp.param_dtype or storage).itemsize
        units.append(unit)
    return units


def _unit_single(model: nn.Module) -> UnitBytes:
    unit = UnitBytes(name="model", kind="model", mesh_size=1)
    for p in model.parameters():
        b = p.numel() * p.element_size()
        unit.numel += p.numel()
        unit.sharded += b
        unit.unsharded += b
        if p.requires_grad:
            unit.sharded_trainable += b
            unit.sharded_trainable_numel += p.numel()
            unit.unsharded_trainable += b
            unit.unsharded_trainable_reduce += b
    return unit


def shard_report(model: nn.Module, ctx, param_dtype) -> ShardReport:
    """Applies parallelize_model (world > 1) to ``model`` (meta) and reads its units. Inside fake_process_group."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtypes = sorted({_dtype_name(p.dtype) for p in model.parameters()})
    if ctx.distributed:
        parallelize_model(model, ctx, param_dtype=param_dtype)
        units = _units_fsdp(model)
    else:
        units = [_unit_single(model)]
    compute = _dtype_name(param_dtype) if param_dtype is not None else dtypes[-1] if len(dtypes) == 1 else "mixed"
    return ShardReport(world_size=ctx.world_size, ep=ctx.ep_size, units=units,
                       buffers=sum(b.numel() * b.element_size() for b in model.buffers()), storage_dtypes=dtypes,
                       compute_dtype=compute, param_numel=total, trainable_numel=trainable)


def real_architecture(cfg: Config) -> Config:
    """The config with the model section the job would really build: a readable init_from folder's config.json
    brings its architecture (the trainer's rule: architecture from the checkpoint, routing from model.moe)."""
    from pathlib import Path

    src = cfg.train.init_from
    if not src or not (Path(src) / "config.json").is_file():
        return cfg

    arch = config_from_hf(read_hf_config(src), str(Path(src) / "config.json"))
    return dataclasses.replace(cfg, model=dataclasses.replace(arch, moe=cfg.model.moe))
