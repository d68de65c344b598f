"""When a plan does not fit: re-plan the job with one change at a time and report each change's peak memory.

Changes tried (each only where it applies): activation checkpointing on; half the micro-batch (twice the
gradient accumulation); LoRA on attention and experts with only routers and adapters training; the next larger
ep that divides the experts and the world; twice the GPUs (more nodes, the same global batch). Each row's peak is
the plan's verdict figure: the largest of the steady step, loading, the first step and the export.
The LoRA change frees more than the optimizer state: frozen weights are stored in the compute dtype (bf16 under
bf16 precision: 2 bytes instead of a 4-byte fp32 master, train/build.py), so a frozen base takes half the memory.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from moe_train.config import Config
from moe_train.planner.hardware import Cluster


def _variants(cfg: Config, cluster: Cluster, job: str) -> list[tuple[str, Config, Cluster]]:
    out = []
    t, p = cfg.train, cfg.parallel
    if job == "train" and not t.activation_checkpointing:
        out.append(("train.activation_checkpointing=true", _with(cfg, train={"activation_checkpointing": True}),
                    cluster))
    if job == "train" and (t.batch_size // cluster.world) % (2 * t.grad_accum_steps) == 0:
        out.append((f"train.grad_accum_steps={2 * t.grad_accum_steps} (half the micro-batch)",
                    _with(cfg, train={"grad_accum_steps": 2 * t.grad_accum_steps}), cluster))
    if job == "train" and not t.lora_rank:
        out.append(("train.lora_rank=16, train.trainable=[router\\., lora_] (LoRA, frozen base)",
                    _with(cfg, train={"lora_rank": 16, "trainable": ["router\\.", "lora_"]}), cluster))
    E = cfg.model.moe.num_experts
    bigger = [e for e in range(p.ep + 1, E + 1) if E % e == 0 and cluster.world % e == 0]
    if bigger:
        out.append((f"parallel.ep={bigger[0]}", _with(cfg, parallel={"ep": bigger[0]}), cluster))
    world2 = 2 * cluster.world
    if t.batch_size % world2 == 0 and (job == "adak" or (t.batch_size // world2) % t.grad_accum_steps == 0):
        out.append((f"{world2} GPUs ({-(-world2 // cluster.gpus_per_node)} nodes of {cluster.gpus_per_node})",
                    _with(cfg, parallel={"world_size": world2}), Cluster(world2, cluster.gpus_per_node, cluster.gpu)))
    return out


def _with(cfg: Config, **sections) -> Config:
    out = cfg
    for name, changes in sections.items():
        out = dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **changes)})
    return out


def suggestions(cfg: Config, cluster: Cluster, job: str, true_experts: Optional[float], imbalance: float,
                plan_once: Callable[..., dict]) -> list[dict]:
    """One row per change of _variants; ``plan_once(cfg, cluster, job, true_experts, imbalance)`` is plan.py's
    planner (passed in: plan.py calls this module)."""
    rows = []
    for what, variant, cl in _variants(cfg, cluster, job):
        try:
            p = plan_once(variant, cl, job, true_experts, imbalance)
        except ValueError as e:
            rows.append({"change": what, "error": str(e)})
            continue
        rows.append({"change": what, "peak_bytes": p["peak_gpu"], "fits": p["fits"],
                     "step_s": p["time"]["serial_s"]})
    return rows
