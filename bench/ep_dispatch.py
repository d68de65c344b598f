"""Expert-parallel MoE layer, forward + backward, at null fractions 0 / 25 / 50 % of the top-k slots, with
DeepSpeed-MoE (same shapes, ep = world) beside it when installed. One JSON object per line.

    torchrun --nproc_per_node 2 bench/ep_dispatch.py            # CPU: gloo, fp32, 1 thread per rank

Each rank routes its own T tokens with a top-k router; a fraction f of the slots is then turned into null picks
(the same slots every iteration, weights renormalised over the remaining true picks, as the AdaMoE null router
does), so rows, bytes and GEMM work follow the true assignments. f = 0 is the plain top-k baseline. Time: median
over iterations of the slowest rank's forward + backward of the whole layer (router, permutation, two
all-to-alls each way, grouped experts, combine). Bytes: payload that crosses ranks in the forward dispatch
all-to-all, summed over ranks; the forward combine and the two backward exchanges move the same amount again.
Goal: bytes proportional to true assignments, and time saved >= 90 % of assignments saved.
Shape legend: T tokens per rank, D hidden, F expert FFN width, E experts, K slots per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist


def _emit(obj: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(obj), flush=True)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _null_mask(idx_TK: torch.Tensor, frac: float, seed: int) -> torch.Tensor:
    S = idx_TK.numel()
    g = torch.Generator().manual_seed(seed)
    null_S = torch.zeros(S, dtype=torch.bool)
    null_S[torch.randperm(S, generator=g)[:round(frac * S)]] = True
    return ~null_S.view_as(idx_TK)


def bench_moe_train(args, ctx, fracs: list[float]) -> list[dict]:
    """One layer; the null fractions are interleaved round by round so drift hits them all alike."""
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts
    from moe_train.routing.plan import counts_from_idx
    from moe_train.routing.topk import renormalize

    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                 moe=MoEConfig(router="topk", num_experts=args.experts, top_k=args.top_k)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    shard_experts(layer.experts, ctx.ep_rank, ctx.ep_size)
    disp = AllToAllDispatcher(ctx.ep_group, args.experts)
    g = torch.Generator().manual_seed(100 + ctx.rank)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    with torch.no_grad():
        slots_TK = layer.router(x).expert_idx_TK
    keeps = {f: _null_mask(slots_TK, f, seed=ctx.rank) for f in fracs}

    def step(frac: float):
        xi = x.detach().requires_grad_(True)
        plan = layer.router(xi)
        keep = keeps[frac]
        plan.expert_idx_TK = torch.where(keep, plan.expert_idx_TK, -1)
        plan.weight_TK = renormalize(plan.weight_TK, keep)
        plan.counts_E = counts_from_idx(plan.expert_idx_TK, args.experts)
        y = disp(xi, plan, layer.experts)
        y.sum().backward()
        layer.zero_grad(set_to_none=True)
        return disp.last

    times = {f: [] for f in fracs}
    last = {}
    for i in range(args.warmup + args.iters):
        for f in fracs:
            dist.barrier()
            t0 = time.perf_counter()
            last[f] = step(f)
            dt = _slowest(time.perf_counter() - t0)
            if i >= args.warmup:
                times[f].append(dt)
    rows = []
    for f in fracs:
        st = torch.tensor([last[f].rows_sent, last[f].rows_received, last[f].bytes_sent_remote], dtype=torch.float64)
        dist.all_reduce(st)
        rows.append({"impl": "moe_train", "null_fraction": f, "true_assignments": int(st[0]),
                     "expected_assignments": ctx.world_size * round(args.tokens * args.top_k * (1 - f)),
                     "slots": args.tokens * args.top_k * ctx.world_size, "rows_received": int(st[1]),
                     # every row entering the all-to-all (own rank included) and the part that crosses ranks
                     "bytes_all_rows": int(st[0]) * args.hidden * 4, "bytes_sent_dispatch": int(st[2]),
                     "time_ms": 1e3 * statistics.median(times[f]),
                     "times_ms": [round(1e3 * t, 2) for t in times[f]]})
    return rows


def bench_deepspeed(args, ctx) -> dict:
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError as e:
        return {"impl": "deepspeed", "skipped": f"deepspeed not installed ({e}); pip install deepspeed "
                "(see docs/parallel.md)"}
    from moe_train.model.experts import SwiGLU

    deepspeed.init_distributed(dist_backend=ctx.backend)  # reuses the existing default group
    torch.manual_seed(0)
    # capacity_factor 2.0 with token dropping: DeepSpeed's dropless EP mode (drop_tokens=False) crashes on gloo.
    moe = MoE(hidden_size=args.hidden, expert=SwiGLU(args.hidden, args.ffn), num_experts=args.experts,
              ep_size=ctx.ep_size, k=args.top_k, capacity_factor=2.0, eval_capacity_factor=2.0, min_capacity=4,
              drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    g = torch.Generator().manual_seed(100 + ctx.rank)
    x = torch.randn(1, args.tokens, args.hidden, generator=g)

    def step():
        xi = x.detach().requires_grad_(True)
        out, l_aux, _ = moe(xi)
        (out.sum() + l_aux).backward()

    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dt = _slowest(time.perf_counter() - t0)
        if i >= args.warmup:
            times.append(dt)
    # DeepSpeed's gates pad every expert to C = ceil(T / E * cf * k) rows (k = 1, 2) and exchange all of them.
    E, k, T, D = args.experts, args.top_k, args.tokens, args.hidden
    capacity = max(4, math.ceil(T / E * 2.0 * k))
    remote = (ctx.ep_size - 1) / ctx.ep_size
    return {"impl": "deepspeed", "version": deepspeed.__version__, "null_fraction": 0.0, "capacity_factor": 2.0,
            "rows_per_rank_padded": E * capacity,
            "bytes_sent_dispatch": int(ctx.world_size * remote * E * capacity * D * 4),
            "time_ms": 1e3 * statistics.median(times), "times_ms": [round(1e3 * t, 2) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--null-fractions", default="0,0.25,0.5")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()

    from moe_train.config import ParallelConfig
    from moe_train.parallel.distributed import destroy_distributed, init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed(ParallelConfig(ep=world), args.experts)
    if not ctx.distributed:
        raise SystemExit("run under torchrun with >= 2 processes, e.g. torchrun --nproc_per_node 2 bench/ep_dispatch.py")
    _emit({"bench": "ep_dispatch", "world": ctx.world_size, "ep": ctx.ep_size, "backend": ctx.backend,
           "threads_per_rank": torch.get_num_threads(), "tokens_per_rank": args.tokens, "hidden": args.hidden,
           "ffn": args.ffn, "experts": args.experts, "top_k": args.top_k, "dtype": "float32"})
    rows = bench_moe_train(args, ctx, [float(f) for f in args.null_fractions.split(",")])
    base = rows[0]
    assert base["null_fraction"] == 0.0, "the first null fraction must be 0 (the top-k baseline)"
    for r in rows:
        saved_a = 1 - r["true_assignments"] / base["true_assignments"]
        saved_t = 1 - r["time_ms"] / base["time_ms"]
        r.update(assignments_vs_topk=r["true_assignments"] / base["true_assignments"],
                 bytes_all_rows_vs_topk=r["bytes_all_rows"] / base["bytes_all_rows"],
                 bytes_sent_vs_topk=r["bytes_sent_dispatch"] / max(base["bytes_sent_dispatch"], 1),
                 time_vs_topk=r["time_ms"] / base["time_ms"], assignments_saved=saved_a, time_saved=saved_t,
                 time_saved_over_assignments_saved=None if saved_a == 0 else saved_t / saved_a)
        _emit(r)
    if not args.no_deepspeed:
        ds = bench_deepspeed(args, ctx)
        if "time_ms" in ds:
            ds["time_vs_moe_train_topk"] = ds["time_ms"] / base["time_ms"]
        _emit(ds)
    destroy_distributed(ctx)


if __name__ == "__main__":
    main()
