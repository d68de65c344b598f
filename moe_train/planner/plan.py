"""``make_plan``: from a config and a cluster to per-GPU memory, bytes, step time, bottleneck and the fit verdict.

The pieces (each module of moe_train/planner/ does one job): build.py (the job's model on meta), shard.py (the
real parallelize_model under a fake process group: per-rank parameter bytes), workload.py (tokens, true experts,
rows), activations.py + memory.py (peak memory), traffic.py (all-to-all and FSDP bytes), roofline.py (time, MFU),
hardware.py (the GPU table), advice.py (what change would fit), startup.py (loading, the first step, the final
save and export). The verdict takes the largest GPU figure of all the phases: steady step, load, first step, export. Rank 0 of the mesh is planned (ranks differ only by
FSDP padding and routing).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moe_train.config import ENGINE_FACTS, Config
from moe_train.model.experts import GroupedExperts
from moe_train.model.flops import forward_flops_per_token
from moe_train.parallel.distributed import ParallelContext, validate_layout
from moe_train.planner.activations import Regime, layer_activations
from moe_train.planner.advice import bound_advice, suggestions
from moe_train.planner.build import build_job_model
from moe_train.planner.hardware import Cluster, gpu_spec
from moe_train.planner.memory import Workload, adak_memory, train_memory
from moe_train.planner.roofline import step_time
from moe_train.planner.shard import PlanError, fake_context, fake_process_group, real_architecture, shard_report
from moe_train.planner.startup import ModelLayout, startup_phases
from moe_train.planner.traffic import Traffic, a2a_traffic, split_collective
from moe_train.planner.workload import adak_tokens, train_tokens

HEADROOM = 0.9  # of HBM usable by tensors: CUDA context, NCCL buffers and allocator fragmentation take the rest
FP8_BACKENDS = ("te_fp8", "fp8_rowwise", "fp8_tensorwise")


def resolve_cluster(cfg: Config, nodes: Optional[int], gpus_per_node: Optional[int], gpu: str) -> Cluster:
    """The world size: --nodes x --gpus-per-node, else parallel.world_size, else one ep group; clear errors."""
    gpu_spec(gpu)
    per = gpus_per_node or 8
    if per < 1 or (nodes is not None and nodes < 1):
        raise ValueError(f"--nodes {nodes} / --gpus-per-node {per}: both must be >= 1")
    asked = nodes * per if nodes is not None else None
    world = asked or cfg.parallel.world_size or max(cfg.parallel.ep, 1)
    if asked is not None and cfg.parallel.world_size is not None and asked != cfg.parallel.world_size:
        raise ValueError(f"--nodes {nodes} x --gpus-per-node {per} = {asked} GPUs, but the config is written for "
                         f"parallel.world_size={cfg.parallel.world_size}: plan it with --set "
                         f"parallel.world_size={asked} (or null), or drop --nodes")
    if world > per and world % per:
        raise ValueError(f"world size {world} is not a whole number of nodes of {per} GPUs: pass --gpus-per-node")
    validate_layout(world, cfg.parallel.ep, cfg.model.moe.num_experts)
    return Cluster(world=world, gpus_per_node=min(per, world), gpu=gpu)


def make_plan(cfg: Config, cluster: Cluster, job: str = "train", true_experts: Optional[float] = None,
              imbalance: float = 1.0, advise: bool = True, memory_true_experts: Optional[float] = None) -> dict:
    """The plan as a JSON-able dict. ``memory_true_experts``: size activations for this load instead of the worst
    case (the validation tests pass the load that was measured)."""
    if not ENGINE_FACTS[cfg.parallel.engine].fsdp2:
        raise PlanError(f"parallel.engine={cfg.parallel.engine!r}: the planner models moe_train's FSDP2 path only "
                        "(parallel/parallelize.py)")
    if imbalance < 1:
        raise ValueError(f"--imbalance {imbalance}: the busiest rank's rows over the mean must be >= 1")
    cfg = real_architecture(cfg)
    plan = _plan_once(cfg, cluster, job, true_experts, imbalance, memory_true_experts)
    if advise and not plan["fits"]:
        plan["suggestions"] = suggestions(cfg, cluster, job, true_experts, imbalance, _plan_once)
    return plan


def _plan_once(cfg: Config, cluster: Cluster, job: str, true_experts: Optional[float], imbalance: float,
               memory_true_experts: Optional[float] = None) -> dict:
    gpu = gpu_spec(cluster.gpu)
    world, ep = cluster.world, cfg.parallel.ep
    toks = (adak_tokens if job == "adak" else train_tokens)(cfg, world, ep, true_experts)
    jm = build_job_model(cfg, job, world)
    reg = Regime(c=2 if jm.bf16 else 4, r=4 if jm.autocast or not jm.bf16 else 2, autocast=jm.autocast)
    if job == "train":  # a layer kind without an activation formula fails before any sharding
        check_formulas(jm.model, reg)
    layout = ModelLayout.of(jm.model)  # the full state, before parallelize_model shards the model in place
    facts = parameter_facts(jm.model, toks.k_expected, toks.k_baseline)  # before sharding: all experts in place
    with fake_process_group(world):
        ctx = fake_context(world, ep) if world > 1 else _single_context()
        rep = shard_report(jm.model, ctx, jm.param_dtype)
        mem, mem_worst = _memory(jm, rep, reg, toks, imbalance, memory_true_experts)
    startup = startup_phases(layout, rep, mem, cfg.train.init_from, bool(cfg.train.lora_rank) and job == "train",
                             cfg.train.export_hf and job == "train", cluster.gpus_per_node)
    peak_at, peak_gpu = max([("steady step", mem.peak), *((k, v["gpu"]) for k, v in startup.items())],
                            key=lambda kv: kv[1])
    startup_gpu = max(v["gpu"] for v in startup.values())
    flops = _flops(cfg, job, toks, rep, jm.activation_checkpointing)
    traffic = _traffic(cfg, job, toks, rep, cluster, reg, toks.k_expected, jm.activation_checkpointing)
    base_traffic = _traffic(cfg, job, toks, rep, cluster, reg, toks.k_baseline, jm.activation_checkpointing)
    fp8 = cfg.model.moe.gemm_backend in FP8_BACKENDS
    hbm = _hbm_bytes(rep, mem, toks, jm.activation_checkpointing, job)
    t = step_time(gpu, flops["dense"], flops["expert"], flops["model"], fp8, hbm, traffic, jm.bf16)
    tb = step_time(gpu, flops["dense"], flops["expert_baseline"], flops["model_baseline"], fp8, hbm, base_traffic,
                   jm.bf16)
    usable = gpu.memory_bytes * HEADROOM
    return {
        "config_model": f"{cfg.model.family} D={cfg.model.hidden_size} L={cfg.model.num_layers} "
                        f"E={cfg.model.moe.num_experts} router={cfg.model.moe.router}",
        "job": job, "gpu": gpu.name, "gpu_key": cluster.gpu, "world": world, "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node, "dp": world // ep, "ep": ep,
        "precision": "bf16" if jm.bf16 else "fp32", "activation_checkpointing": jm.activation_checkpointing,
        "params_total": rep.param_numel, "params_trainable": rep.trainable_numel,
        **facts,
        "tokens": dataclasses.asdict(toks),
        "memory": mem.as_dict(), "memory_worst_case": {"peak": mem_worst.peak, "bound": toks.worst_bound,
                                                       "rows_recv": toks.rows_recv_worst},
        "startup": startup, "peak_gpu": peak_gpu, "peak_gpu_at": peak_at,
        "peak_host_per_node": max(v["host_per_node"] for v in startup.values()),
        "usable_bytes": usable, "fits": peak_gpu <= usable, "fits_worst_case": max(mem_worst.peak, startup_gpu) <= usable,
        "flops": flops,
        "traffic": dataclasses.asdict(traffic), "traffic_topk_baseline": dataclasses.asdict(base_traffic),
        "time": dataclasses.asdict(t), "time_topk_baseline": dataclasses.asdict(tb),
        "bottleneck": bound_advice(t.terms, cfg, cluster, jm.bf16 and rep.trainable_numel < rep.param_numel),
    }


# Parameters the job adds to the family's architecture: LoRA adapters (merged into the base at the end), AdaMoE's
# null gate and constant null values, Ada-K's allocators. Without them the count is the published model's.
ADDED_PARAMS = ("lora_", "null_gate", "null_values", "allocator")


def _is_base(name: str) -> bool:
    return not any(key in name for key in ADDED_PARAMS)


def active_params(model: torch.nn.Module, k: float) -> float:
    """BASE parameters (no ADDED_PARAMS) one token uses in a forward at ``k`` true experts per MoE layer: all but
    the routed experts (attention, norms, routers, shared experts, the embedding table and the head), plus k / E of
    each layer's routed experts. The model on meta, before sharding (an expert-parallel module holds its block)."""
    total = sum(p.numel() for n, p in model.named_parameters() if _is_base(n))
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            routed = sum(p.numel() for n, p in module.named_parameters() if _is_base(n))
            total -= routed * (1 - min(k, module.num_experts) / module.num_experts)
    return total


def parameter_facts(model: torch.nn.Module, k_expected: float, k_baseline: float) -> dict:
    """The plan's parameter figures beyond total / trainable: the base architecture's size (comparable to the
    published one) and the active parameters per token at the expected and the top-k baseline true experts.
    Published "active" figures differ on the embedding: Mixtral, Qwen count the embedding table (Mixtral-8x7B
    12.9 B = 12.75 B + 0.13 B embedding), DeepSeek-V2-Lite's 2.4 B does not (2.66 B with it, 2.45 B without),
    so both are given. A tied table is the head's weight too (a GEMM every token runs): it stays in both."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    embed = 0 if tied else sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed_tokens."))
    active, active_base = active_params(model, k_expected), active_params(model, k_baseline)
    return {"params_base": sum(p.numel() for n, p in model.named_parameters() if _is_base(n)),
            "params_active_per_token": active, "params_active_per_token_topk_baseline": active_base,
            "params_active_per_token_no_embedding": active - embed,
            "params_active_per_token_topk_baseline_no_embedding": active_base - embed}


def check_formulas(model, reg: Regime) -> None:
    for layer in model.layers:
        layer_activations(layer, reg)


def _single_context():
    return ParallelContext(device=torch.device("meta"))


def _memory(jm, rep, reg: Regime, toks, imbalance: float, k_memory: Optional[float]):
    N = toks.rows_sent if k_memory is None else toks.tokens * k_memory
    w = Workload(tokens=toks.tokens, rows_sent=N, rows_recv=N * imbalance, accumulating=toks.micro_batches > 1,
                 grad_tokens=toks.grad_tokens)
    worst = dataclasses.replace(w, rows_recv=max(toks.rows_recv_worst, w.rows_recv))
    if jm.job == "adak":
        return adak_memory(jm.model, rep, reg, w), adak_memory(jm.model, rep, reg, worst)
    return (train_memory(jm.model, rep, reg, w, jm.activation_checkpointing),
            train_memory(jm.model, rep, reg, worst, jm.activation_checkpointing))


def _flops(cfg: Config, job: str, toks, rep, ac: bool) -> dict:
    """Per rank per optimizer step. Forward FLOPs per token from moe_train/model/flops.py, split into the routed
    experts (the part that scales with true experts per token) and the rest."""
    S, m = cfg.train.seq_len, cfg.model
    fwd = forward_flops_per_token(m, toks.k_expected, S)
    fwd_base = forward_flops_per_token(m, toks.k_baseline, S, include_routing_extras=False)
    no_expert = forward_flops_per_token(m, 0.0, S)
    expert, expert_base = fwd - no_expert, fwd_base - forward_flops_per_token(m, 0.0, S, include_routing_extras=False)
    n_tok = toks.tokens_per_step
    if job == "adak":
        passes, model_passes = 1.0, 1.0  # every Ada-K forward is counted in tokens_per_step; the backward is tiny
    else:
        frac = rep.trainable_numel / max(rep.param_numel, 1)
        model_passes = 2.0 + frac
        passes = model_passes + (1.0 if ac else 0.0)
    return {"forward_per_token": fwd, "forward_per_token_topk_baseline": fwd_base,
            "flops_vs_topk": fwd / fwd_base, "passes": passes,
            "dense": no_expert * n_tok * passes, "expert": expert * n_tok * passes,
            "expert_baseline": expert_base * n_tok * passes,
            "model": fwd * n_tok * model_passes, "model_baseline": fwd_base * n_tok * model_passes}


def _traffic(cfg: Config, job: str, toks, rep, cluster: Cluster, reg: Regime, k: float, ac: bool) -> Traffic:
    ep, world, G, me = cfg.parallel.ep, cluster.world, cluster.gpus_per_node, 0
    L = sum(1 for u in rep.units if u.kind == "experts") or cfg.model.num_layers
    passes = 2 if job == "adak" else (6 if ac else 4)
    row_bytes = cfg.model.hidden_size * reg.c
    intra, inter = a2a_traffic(toks.tokens * k, row_bytes, L, passes * toks.micro_batches, ep, G, me)
    tr = Traffic(a2a_intra=intra, a2a_inter=inter)
    all_gather = reduce_scatter = 0.0
    for u in rep.units:
        if u.kind == "model":
            continue
        # experts units are sharded over the expert-data-parallel group, every other unit over the world
        ranks = [me % ep + j * ep for j in range(world // ep)] if u.kind == "experts" else list(range(world))
        ag = split_collective(u.unsharded, ranks, G, me)
        n_ag = toks.micro_batches * gathers_per_micro_batch(u, job)
        rs = split_collective(u.unsharded_trainable_reduce, ranks, G, me) if job != "adak" else (0.0, 0.0)
        tr.fsdp_intra += ag[0] * n_ag + rs[0] * toks.micro_batches
        tr.fsdp_inter += ag[1] * n_ag + rs[1] * toks.micro_batches
        all_gather += (ag[0] + ag[1]) * n_ag
        reduce_scatter += (rs[0] + rs[1]) * toks.micro_batches
    tr.detail = {"a2a_rows_per_layer": toks.tokens * k, "a2a_exchanges_per_layer": passes * toks.micro_batches,
                 "row_bytes": row_bytes, "fsdp_all_gather_bytes": all_gather,
                 "fsdp_reduce_scatter_bytes": reduce_scatter}
    return tr


def gathers_per_micro_batch(unit, job: str) -> int:
    """All-gathers of one FSDP2 unit per micro-batch: one for a forward-only job (Ada-K) or a unit kept gathered
    from its forward to its backward (the root, the last block, norm + head), else two (forward, backward)."""
    return 1 if job == "adak" or unit.kept_after_forward else 2


def _hbm_bytes(rep, mem, toks, ac: bool, job: str) -> float:
    """Weights read once per pass (forward, backward, recompute) per micro-batch + activations written and read."""
    weights = rep.total("unsharded")
    passes = 1 if job == "adak" else (3 if ac else 2)
    return toks.micro_batches * (weights * passes + 2 * mem.activations)
