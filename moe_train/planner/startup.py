"""The moments of a job outside its steady step: loading the model, the first step, the final save and export.

A job's first and last minutes hold what its steady step does not (train/build.py, train/trainer.py):

  load         each rank allocates its local shards (``to_empty``) and fills them one source tensor at a time
               (io/sources.py): on the GPU the shards and one block in flight; on the host, per rank, the piece of
               the source in hand: a Hugging Face folder one decoder layer at a time with this rank's experts only
               (read, then converted to our names: two copies), a model.pt one tensor or one block of expert rows,
               a fresh model one generated tensor (fp32, drawn then scaled: two copies); and, loading from a
               source, every router whole in fp32 twice (the conversions' model and the converted copies kept aside)
  first step   the steady step without the AdamW moments, which the first optimizer step creates
  export       final model.pt (parallel/state.py iter_full_state, io/model_file.py save_model_stream): every rank
               gathers each full tensor in turn (an expert tensor: its dp-gathered ep block, the ep parts, their
               concatenation), LoRA merged one module at a time (model/lora.py merge_lora_stream: the module's full
               tensors, the merged ones and one delta); the training state is still on the GPU. Rank 0 writes each
               tensor from the host (a host copy and its bytes). Then, with train.export_hf, rank 0 reads the
               model.pt one decoder layer at a time and writes it converted (two copies of a layer on the host)

Host figures are per node (each rank of a node loads its own piece at the same time; the export runs on rank 0's
node). The source dtype is planned as bf16 for a Hugging Face folder (what Mixtral / Qwen folders ship) and fp32
for a model.pt (the widest a moe_train job saves).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moe_train.model.experts import GroupedExperts
from moe_train.model.lora import _lora_unit, merge_lora_state_dict
from moe_train.planner.memory import MemoryBreakdown
from moe_train.planner.shard import ShardReport

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class Phase:
    gpu: int  # bytes on rank 0's GPU at the phase's peak
    host_per_node: int  # bytes of tensors on the host of the busiest node
    what: str  # what peaks


@dataclass
class ModelLayout:
    """The full (unparallelized) state of the job's model, read off the meta model before parallelize_model."""

    specs: Specs  # state-dict name -> (full shape, storage dtype)
    expert_names: set  # stacked per-expert tensors (split over ep, then over dp)
    router_numel: int  # every router's state, all layers

    @classmethod
    def of(cls, model: nn.Module) -> "ModelLayout":
        specs = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}
        names = {m: n for n, m in model.named_modules()}
        experts = {f"{names[m]}.{leaf}" for m in model.modules() if isinstance(m, GroupedExperts)
                   for leaf, _ in m.stacked_parameters()}
        routers = sum(t.numel() for n, t in model.state_dict().items() if ".moe.router." in n)
        return cls(specs=specs, expert_names=experts, router_numel=routers)

    def nbytes(self, name: str, dtype: Optional[torch.dtype] = None) -> int:
        shape, stored = self.specs[name]
        return prod(shape) * (dtype or stored).itemsize


def startup_phases(layout: ModelLayout, rep: ShardReport, mem: MemoryBreakdown, init_from: Optional[str],
                   lora: bool, export_hf: bool, gpus_per_node: int) -> dict[str, dict]:
    """The load, first-step and export phases of rank 0 (and its node), as JSON-able dicts."""
    phases = {"load": _load(layout, rep, mem, init_from, gpus_per_node),
              "first step": _first_step(mem),
              "export model.pt": _export_model_file(layout, rep, mem, lora)}
    if export_hf:
        phases["export hf"] = _export_hf(layout, mem, lora)
    return {k: asdict(v) for k, v in phases.items()}


def _training_state(mem: MemoryBreakdown) -> int:
    """What stays on the GPU after the last step: shards, buffers, AdamW moments and the last step's gradients
    (they are set to None only at the start of a step)."""
    return mem.params + mem.buffers + mem.optimizer + mem.gradients


def _first_step(mem: MemoryBreakdown) -> Phase:
    first = {k: v if k == "optimizer step" else v - mem.optimizer for k, v in mem.candidates.items()}
    at, peak = max(first.items(), key=lambda kv: kv[1])
    return Phase(gpu=int(peak), host_per_node=0, what=f"{at} (no AdamW moments before the first optimizer step)")


# ----------------------------------------------------------------------------------------------------------
# load


def _source_kind(init_from: Optional[str]) -> str:
    """train/build.py open_source's rule (a folder is a Hugging Face folder, a file a model.pt), also for a path
    that does not exist on this machine (a config written for the cluster): a *.pt name is a model file."""
    if init_from is None:
        return "fresh"
    path = Path(init_from)
    return "model.pt" if path.is_file() or (not path.is_dir() and path.suffix == ".pt") else "hf"


def _load(layout: ModelLayout, rep: ShardReport, mem: MemoryBreakdown, init_from: Optional[str],
          gpus_per_node: int) -> Phase:
    kind = _source_kind(init_from)
    ep = rep.ep
    if kind == "hf":
        piece, what = 2 * _largest_layer(layout, torch.bfloat16, ep), "one decoder layer of the Hugging Face folder"
    elif kind == "model.pt":
        piece, what = _largest_read(layout, torch.float32, ep), "one tensor of the model.pt"
    else:
        piece, what = 2 * _largest_read(layout, torch.float32, ep), "one fresh tensor"
    routers = 0 if kind == "fresh" else 2 * 4 * layout.router_numel
    # the block in flight reaches the GPU in the source dtype before the copy into the shard casts it
    in_flight = _largest_read(layout, torch.bfloat16 if kind == "hf" else torch.float32, rep.world_size)
    return Phase(gpu=mem.params + mem.buffers + in_flight, host_per_node=gpus_per_node * (piece + routers),
                 what=f"local shards + {what} per rank on the host" + (", routers whole" if routers else ""))


def _read_bytes(layout: ModelLayout, name: str, dtype: torch.dtype, split: int) -> int:
    """A rank's read of ``name``: the whole tensor, or of a stacked expert tensor its 1/``split`` block of experts."""
    return layout.nbytes(name, dtype) // (split if name in layout.expert_names else 1)


def _largest_read(layout: ModelLayout, dtype: torch.dtype, split: int) -> int:
    return max(_read_bytes(layout, n, dtype, split) for n in layout.specs)


def _layer_of(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else "globals"


def _largest_layer(layout: ModelLayout, dtype: torch.dtype, split: int) -> int:
    """The largest decoder layer (or the embedding + head + norm) as one rank reads it: its experts only."""
    per_layer: dict[str, int] = {}
    for name in layout.specs:
        per_layer[_layer_of(name)] = per_layer.get(_layer_of(name), 0) + _read_bytes(layout, name, dtype, split)
    return max(per_layer.values())


# ----------------------------------------------------------------------------------------------------------
# export


def _merge_groups(layout: ModelLayout, lora: bool) -> list[list[str]]:
    """The tensors the streamed save holds together: one LoRA module's (merge_lora_stream), else one tensor."""
    groups: list[list[str]] = []
    for name in layout.specs:
        if lora and groups and _lora_unit(name) == _lora_unit(groups[-1][0]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _merged(layout: ModelLayout, group: list[str]) -> dict[str, torch.Tensor]:
    """The group's merged tensors on the meta device (their shapes and dtypes; LoRA's fp32 delta promotes)."""
    meta = {n: torch.empty(layout.specs[n][0], dtype=layout.specs[n][1], device="meta") for n in group}
    out = merge_lora_state_dict(meta, alpha=1.0)
    return {n: t for n, t in out.items() if t is not meta.get(n)}  # new tensors only


def _gather_bytes(layout: ModelLayout, name: str, ep: int) -> int:
    """Bytes one rank allocates to gather ``name`` whole: the full tensor; a stacked expert tensor under ep > 1:
    its ep block gathered over dp, the ep parts and their concatenation."""
    full = layout.nbytes(name)
    return full // ep + 2 * full if name in layout.expert_names and ep > 1 else full


def _group_peak(layout: ModelLayout, group: list[str], ep: int, distributed: bool) -> int:
    """The largest moment of one group: gathering each tensor beside the ones already held, then the merge."""
    held = peak = 0
    for name in group:
        if distributed:  # one process yields the model's own tensors: nothing is gathered
            peak = max(peak, held + _gather_bytes(layout, name, ep))
            held += layout.nbytes(name)
    new = [t.numel() * t.element_size() for t in _merged(layout, group).values()]
    return max(peak, held + sum(new) + max(new, default=0))  # the merged tensors and one delta being added


def _export_model_file(layout: ModelLayout, rep: ShardReport, mem: MemoryBreakdown, lora: bool) -> Phase:
    groups = _merge_groups(layout, lora)
    gpu = max(_group_peak(layout, g, rep.ep, rep.world_size > 1) for g in groups)
    written = max(_written_bytes(layout, g) for g in groups)
    return Phase(gpu=_training_state(mem) + gpu, host_per_node=2 * written,
                 what="training state + one full tensor gathered" + (" and its LoRA module merged" if lora else "")
                 + "; rank 0 writes it from the host")


def _written_bytes(layout: ModelLayout, group: list[str]) -> int:
    """The largest tensor of ``group`` as model.pt stores it (merged where LoRA merges)."""
    merged = {n: t.numel() * t.element_size() for n, t in _merged(layout, group).items()}
    return max([*merged.values(), *(layout.nbytes(n) for n in group if ".lora_" not in n)], default=0)


def _export_hf(layout: ModelLayout, mem: MemoryBreakdown, lora: bool) -> Phase:
    """Rank 0 reads the final model.pt one decoder layer at a time and writes it converted: two copies."""
    per_layer: dict[str, int] = {}
    for group in _merge_groups(layout, lora):
        key = _layer_of(group[0])
        merged = _merged(layout, group)
        kept = [n for n in group if ".lora_" not in n and n not in _replaced(group, merged)]
        size = sum(layout.nbytes(n) for n in kept) + sum(t.numel() * t.element_size() for t in merged.values())
        per_layer[key] = per_layer.get(key, 0) + size
    return Phase(gpu=_training_state(mem), host_per_node=2 * max(per_layer.values()),
                 what="rank 0: one decoder layer of the final model.pt and its Hugging Face copy")


def _replaced(group: list[str], merged: dict) -> set:
    """Inputs a merge replaces by a new tensor (a LoRALinear's base.weight by .weight; a stacked expert weight by
    itself merged)."""
    return {n for n in group if n in merged or n.replace(".base.", ".") in merged}
