"""When a plan does not fit: re-plan the job with one change at a time and report each change's peak memory.

Changes tried (each only where it applies): activation checkpointing on; half the micro-batch (twice the
gradient accumulation); LoRA on attention and experts with only routers and adapters training; the next larger
ep that divides the experts and the world; twice the GPUs (more nodes, the same global batch). Each row's peak is
the plan's verdict figure: the largest of the steady step, loading, the first step and the export.
The LoRA change frees more than the optimizer state: frozen weights are stored in the compute dtype (bf16 under
bf16 precision: 2 bytes instead of a 4-byte fp32 master, train/build.py), so a frozen base takes half the memory.
Every plan also names the term that bounds its step time and the remedies for it (``bound_advice``), each marked
implemented or not.
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


# ----------------------------------------------------------------------------------------------------------
# what bounds the step, and what would lower that term
#
# The fit advice above answers "does it fit"; this answers "what is the step waiting on". Each remedy says whether
# moe_train implements it, so a user never reads a remedy as a setting that does not exist.

TERM_NAMES = {"compute": "compute (GEMM FLOPs at the GPU's peak)", "hbm": "HBM traffic (weights + activations)",
              "a2a_nvlink": "expert all-to-all over NVLink", "a2a_ib": "expert all-to-all over InfiniBand",
              "fsdp_nvlink": "FSDP all-gather / reduce-scatter over NVLink",
              "fsdp_ib": "FSDP all-gather / reduce-scatter over InfiniBand"}

_FEWER_EXPERTS = ("fewer true experts per token: null experts with a compute budget (model.moe.router: null_experts, "
                  "model.moe.target_true_experts); FLOPs and all-to-all bytes scale with it", True)
_OVERLAP = ("overlap the all-to-all with the expert GEMMs (parallel.a2a_overlap_chunks >= 2; measured on CPU only, "
            "the roofline's serial sum does not credit it)", True)
_FEWER_MICRO = ("fewer micro-batches per step (lower train.grad_accum_steps): every micro-batch all-gathers the "
                "weights again", True)


def _remedies(term: str, cfg: Config, cluster: Cluster, frozen_bf16: bool) -> list[tuple[str, bool]]:
    t, moe = cfg.train, cfg.model.moe
    if term == "compute":
        out = [_FEWER_EXPERTS]
        if moe.gemm_backend not in ("te_fp8", "fp8_rowwise", "fp8_tensorwise"):
            out.append(("FP8 expert GEMMs (model.moe.gemm_backend: fp8_rowwise or te_fp8)", True))
        if t.activation_checkpointing:
            out.append(("activation checkpointing off where memory allows: it recomputes every forward", True))
        return out
    if term == "hbm":
        return [("a larger micro-batch (lower train.grad_accum_steps): the weights are read once per "
                 "micro-batch", True)]
    if term.startswith("a2a"):
        out = [_FEWER_EXPERTS, _OVERLAP, ("FP8 dispatch (rows sent in FP8, as DeepSeek-V3)", False)]
        if term == "a2a_ib":
            out.insert(0, (f"keep each expert-parallel group inside a node: parallel.ep <= {cluster.gpus_per_node} "
                           "(GPUs per node), so the all-to-all stays on NVLink", True))
            out.append(("node-limited routing (each token to experts on at most M nodes, DeepSeek-V3)", False))
        return out
    out = [("frozen weights stored in bf16: half the all-gather bytes of an fp32 master (automatic for frozen "
            "weights under bf16 precision: train.trainable / LoRA, train/build.py)"
            + ("; already so in this plan" if frozen_bf16 else ""), True)]
    if t.grad_accum_steps > 1:
        out.append(_FEWER_MICRO)
    out.append(("keep frozen experts in bf16, unsharded over dp (replicated: no all-gather for weights that never "
                "change)", False))
    if term == "fsdp_ib":
        out.append(("HSDP: shard within a node, replicate across nodes (only the gradient reduction crosses "
                    "InfiniBand)", False))
    return out


def bound_advice(terms: dict, cfg: Config, cluster: Cluster, frozen_bf16: bool = False) -> dict:
    """The largest roofline term of the step (planner/roofline.py), its share of the serial step, and the remedies
    for it, each with ``implemented``: whether moe_train has it (a setting to change) or not (work to do).
    ``frozen_bf16``: the plan already stores frozen weights in bf16 (said so, not offered as a change)."""
    term = max(terms, key=terms.get)
    serial = sum(v for k, v in terms.items() if k != "hbm") or 1.0  # hbm overlaps the rest (roofline.py)
    return {"term": term, "what": TERM_NAMES.get(term, term), "seconds": terms[term],
            "share_of_serial": terms[term] / serial,
            "remedies": [{"remedy": r, "implemented": ok} for r, ok in _remedies(term, cfg, cluster, frozen_bf16)]}
