"""A layout-free view of a DeepSpeed checkpoint: what lets it resume at another world size, ep or ZeRO stage.

DeepSpeed's own checkpoint (train/deepspeed_engine.py) stores each rank's ZeRO partition, whose layout depends on the
world size, the ep size (expert groups are partitioned over the expert-data-parallel group, and each ep rank holds
other experts under the same parameter name), the stage (ZeRO-1/2 cut flat parameter groups, ZeRO-3 each
parameter) and the group split. Beside it, every
rank writes the pieces of the state it owns under layout-free coordinates:

    view/index.json            rank 0: format, writer's layout and stage, the optimizer-state keys, every trainable
                               parameter's FULL name and shape (experts stacked in global order, the names of
                               parallel/state.py's full state), and every fragment: (name, flat start, numel,
                               file, AdamW step)
    view/rank<r>_<i>.pt        rank r's fragments: the fp32 master (``param/<name>@<start>``) and each optimizer
                               moment (``exp_avg/<name>@<start>``, ...), 1-D, at their offset in the FULL
                               flattened tensor (an expert shard's offset is its first global expert's)
    view/buffers.pt            rank 0: the model's persistent buffers (routing biases; never ep-sharded)

A fragment is exactly the slice of a parameter that the rank's ZeRO partition holds (ZeRO-1/2: DeepSpeed's own
``_hp_mapping``; ZeRO-3: the parameter's partition), so the save gathers nothing and each element is written once; files are cut at FILE_BYTES. On
resume at another layout each rank reads, through memory-mapped files, only the slices its new partition needs
(load_view), sets its fp32 masters and moments in place, and DeepSpeed's all-gather refreshes the module weights.
No rank ever holds more than its own partition (plus one file's fragments while saving).

Frozen parameters are not in it (they are rebuilt from train.init_from, which a resume checks is unchanged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.state import expert_shards

log = logging.getLogger(__name__)

VIEW = "view"  # the sub-folder of a moe_train checkpoint
INDEX = "index.json"
BUFFERS = "buffers.pt"
FORMAT = 1
FILE_BYTES = 1 << 30  # a rank starts a new file past this many bytes of fragments (bounds the save's extra memory)


class ViewError(ValueError):
    """The view cannot serve this launch (another model, no view); the message says why and what to do."""


@dataclass
class _Piece:
    """One trainable parameter's slice held by this rank: ``master`` is its fp32 master (a view into DeepSpeed's flat
    fp32 partition ``flat``, at ``offset``), ``start`` its offset in the FULL flattened parameter."""

    name: str
    start: int
    flat: torch.Tensor
    offset: int
    numel: int

    @property
    def master(self) -> torch.Tensor:
        return self.flat.narrow(0, self.offset, self.numel)

    def state(self, flat_state: torch.Tensor) -> torch.Tensor:
        """The same slice of one per-element optimizer state tensor of ``flat``. Read from the state itself, not
        from DeepSpeed's ``optim_fragment`` links: 0.19.8 links them once, after the first group's first step, when
        the other groups have no state yet (their links stay empty)."""
        return flat_state.narrow(0, self.offset, self.numel)


def _pieces(model: nn.Module, zopt, ctx: ParallelContext) -> list[_Piece]:
    """This rank's pieces, in named_parameters order. ZeRO-1/2 (and the BF16_Optimizer DeepSpeed uses for bf16
    ZeRO-1 with fp32 gradient accumulation) cut flat parameter groups, each parameter mapped by its ``_hp_mapping``;
    ZeRO-3 partitions each parameter on its own (rank r: elements [r x n, (r + 1) x n), the last padded)."""
    out = []
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # ZeRO-3 (ep 1: config.py refuses ep > 1 with stage 3)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group, offset, n = zopt.grad_position[zopt.get_param_id(p)]
            start = zopt._get_param_partition_rank(p) * n
            numel = min(n, p.ds_numel - start)
            if numel > 0:
                out.append(_Piece(name, start, zopt.fp32_partitioned_groups_flat[group], offset, numel))
        return out
    flats = getattr(zopt, "single_partition_of_fp32_groups", None) or zopt.fp32_groups_flat_partition
    shards = expert_shards(model)
    for name, p in model.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if not p.requires_grad or mapping is None:
            continue
        address = mapping.hp_fragment_address
        start = _expert_base(name, p, shards, ctx) + mapping.lp_fragment_address.start
        out.append(_Piece(name, start, flats[mapping.param_group_index], address.start, address.numel))
    return out


def _state_keys(state: dict, flat: torch.Tensor) -> list[str]:
    """The optimizer state that is per element (AdamW: exp_avg, exp_avg_sq), as DeepSpeed's fragments select it."""
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)


def _expert_base(name: str, p: torch.Tensor, shards: dict, ctx: ParallelContext) -> int:
    """Offset of this rank's tensor in the FULL flattened parameter: its first global expert's for an ep shard."""
    shard = shards.get(name)
    if shard is None or ctx.ep_size == 1:
        return 0
    return shard.offset * (p.numel() // p.shape[0])


def _full_shape(name: str, p: torch.Tensor, shards: dict, ctx: ParallelContext) -> list[int]:
    shape = list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape beside an empty tensor
    shard = shards.get(name)
    if shard is None or ctx.ep_size == 1:
        return shape
    return [shard.num_global, *shape[1:]]


def trainable_specs(model: nn.Module, ctx: ParallelContext) -> dict[str, list[int]]:
    """FULL name -> full shape of every trainable parameter (what the view holds)."""
    shards = expert_shards(model)
    return {n: _full_shape(n, p, shards, ctx) for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------------------
# save


@torch.no_grad()
def write_view(folder: Path, model: nn.Module, zopt, ctx: ParallelContext, stage: int) -> None:
    """Collective: every rank writes its pieces into folder/view/, rank 0 the index and the buffers."""
    out = Path(folder) / VIEW
    if ctx.is_main:
        out.mkdir()
    dist.barrier()
    opt = zopt.optimizer
    keys: Optional[list[str]] = None
    entries, pending, size, files = [], {}, 0, 0

    def flush():
        nonlocal pending, size, files
        if pending:
            torch.save(pending, out / f"rank{ctx.rank:05d}_{files:03d}.pt")
            pending, size, files = {}, 0, files + 1

    for piece in _pieces(model, zopt, ctx):  # only local work: no collective in this loop
        state = opt.state.get(piece.flat, {})
        mine = _state_keys(state, piece.flat)
        assert keys is None or mine == keys, (piece.name, mine, keys)
        keys = mine
        tag = f"{piece.name}@{piece.start}"
        pending[f"param/{tag}"] = piece.master.detach().float().clone()  # a copy: saving a view saves its storage
        for k in mine:
            pending[f"{k}/{tag}"] = piece.state(state[k]).detach().float().clone()
        step = float(state["step"]) if "step" in state else None
        entries.append([piece.name, piece.start, piece.numel, f"rank{ctx.rank:05d}_{files:03d}.pt", step])
        size += piece.numel * 4 * (1 + len(mine))
        if size >= FILE_BYTES:
            flush()
    flush()
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, {"entries": entries, "keys": keys})
    if ctx.is_main:
        all_keys = {tuple(g["keys"]) for g in gathered if g["keys"] is not None}
        assert len(all_keys) <= 1, all_keys
        index = {"format": FORMAT, "stage": stage, "world_size": ctx.world_size, "ep_size": ctx.ep_size,
                 "optimizer_keys": list(next(iter(all_keys), ())),
                 "params": {n: {"shape": s} for n, s in trainable_specs(model, ctx).items()},
                 "fragments": [e for g in gathered for e in g["entries"]]}
        (out / INDEX).write_text(json.dumps(index))
        param_names = {n for n, _ in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in param_names}
        assert not set(buffers) & set(expert_shards(model))  # buffers are never ep-sharded
        torch.save(buffers, out / BUFFERS)
    dist.barrier()


# ------------------------------------------------------------------------------------------------------------------
# resume


def read_index(folder: Path) -> dict:
    path = Path(folder) / VIEW / INDEX
    if not path.is_file():
        raise ViewError(f"checkpoint {str(folder)!r} has no layout-free view ({VIEW}/{INDEX}): it was written by "
                        "a moe_train version without one, and resumes only at the world size, parallel.ep and "
                        "deepspeed.stage that wrote it")
    return json.loads(path.read_text())


def check_view(folder: Path, index: dict, model: nn.Module, ctx: ParallelContext) -> None:
    """Refuses, before anything is loaded, a launch the view cannot serve: another set of trainable parameters or
    another full shape (e.g. a different number of experts)."""
    if index.get("format") != FORMAT:
        raise ViewError(f"checkpoint {str(folder)!r}: layout-free view format {index.get('format')} is not "
                        f"{FORMAT} (written by another moe_train version)")
    have = {n: r["shape"] for n, r in index["params"].items()}
    want = trainable_specs(model, ctx)
    if have != want:
        diffs = [f"{n}: {have.get(n, '(absent)')} in the checkpoint, {want.get(n, '(absent)')} now"
                 for n in sorted(have.keys() | want.keys()) if have.get(n) != want.get(n)]
        raise ViewError(f"checkpoint {str(folder)!r} cannot resume this model at another layout: its trainable "
                        f"parameters (full names and shapes) differ: {'; '.join(diffs[:4])}"
                        f"{f' (+{len(diffs) - 4} more)' if len(diffs) > 4 else ''}. Resume with the config that "
                        "wrote it (the number of experts, LoRA and train.trainable fix the parameters)")


class _Reader:
    """Slices of the view's 1-D fragments, files memory-mapped (a slice reads only its pages)."""

    def __init__(self, folder: Path, index: dict):
        self.folder = Path(folder) / VIEW
        self.by_name: dict[str, list] = {}
        for name, start, numel, fname, step in index["fragments"]:
            self.by_name.setdefault(name, []).append((start, numel, fname, step))
        for frags in self.by_name.values():
            frags.sort()
        self.files: dict[str, dict] = {}

    def _file(self, fname: str) -> dict:
        if fname not in self.files:
            self.files[fname] = torch.load(self.folder / fname, map_location="cpu", mmap=True, weights_only=True)
        return self.files[fname]

    def read(self, name: str, kind: str, start: int, out: torch.Tensor) -> None:
        """out[:] = the full flattened ``name``'s state ``kind`` over [start, start + out.numel())."""
        end, covered = start + out.numel(), 0
        for s, n, fname, _ in self.by_name.get(name, []):
            a, b = max(start, s), min(end, s + n)
            if a >= b:
                continue
            src = self._file(fname)[f"{kind}/{name}@{s}"]
            out[a - start:b - start].copy_(src[a - s:b - s])
            covered += b - a
        assert covered == out.numel(), (name, kind, start, out.numel(), covered)  # fragments tile each parameter

    def step(self, name: str) -> Optional[float]:
        steps = {f[3] for f in self.by_name[name]}
        assert len(steps) == 1, (name, steps)
        return next(iter(steps))


@torch.no_grad()
def load_view(folder: Path, index: dict, model: nn.Module, zopt, ctx: ParallelContext) -> None:
    """Collective (after check_view): this rank's fp32 masters and optimizer moments from the slices of the view
    its partitions hold, the AdamW step counts, the buffers; then DeepSpeed's own copy of the masters into the
    module's weights (ZeRO-1/2: all-gathered; ZeRO-3: into each parameter's partition)."""
    opt = zopt.optimizer
    keys = index["optimizer_keys"]
    reader = _Reader(folder, index)
    pieces = _pieces(model, zopt, ctx)
    if keys:  # the state as torch.optim.AdamW creates it at its first step, with the saved step count
        flats: dict[int, tuple[torch.Tensor, set]] = {}
        for piece in pieces:
            flats.setdefault(id(piece.flat), (piece.flat, set()))[1].add(reader.step(piece.name))
        on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
        for flat, steps in flats.values():
            assert not opt.state.get(flat) and len(steps) == 1, steps  # before any step; a group steps together
            step = torch.tensor(float(steps.pop()), dtype=torch.float32, device=flat.device if on_device else "cpu")
            opt.state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in keys}}
        if hasattr(zopt, "_hp_optimizer_states_linked"):  # ZeRO-1/2: DeepSpeed's fragment links to the new state
            zopt._hp_optimizer_states_linked = False
            zopt._lazy_init_hp_params_optimizer_state()
    for piece in pieces:
        state = opt.state.get(piece.flat, {})
        for kind, dst in [("param", piece.master)] + [(k, piece.state(state[k])) for k in keys]:
            buf = torch.empty(piece.numel, dtype=torch.float32)
            reader.read(piece.name, kind, piece.start, buf)
            dst.copy_(buf.to(dst.device, dst.dtype))
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # ZeRO-3: the masters into each parameter's own partition
        for group in range(len(zopt.fp32_partitioned_groups_flat)):
            zopt._reassign_or_swap_out_partitioned_parameters(group)
    else:  # each rank's masters -> its bit16 partition, all-gathered into the module weights
        zopt.update_lp_params()
    buffers = torch.load(Path(folder) / VIEW / BUFFERS, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(buffers, strict=False)
    assert not unexpected, unexpected
    log.info(f"loaded the layout-free view of {folder} (written by {index['world_size']} ranks, ep "
             f"{index['ep_size']}, ZeRO stage {index['stage']}) at {ctx.world_size} ranks, ep {ctx.ep_size}")
