"""Exposed all-to-all time of one expert-parallel MoE layer with and without overlap (parallel/overlap.py), 2 gloo
ranks spawned by this script (or any world under torchrun). One JSON object per line, rank 0 prints.

    python bench/a2a_overlap.py [--world 2 --tokens 4096 --hidden 256 --ffn 512 --experts 8 --chunks 1,2,4 --iters 9]

Each variant runs the layer forward + backward (router, permutation, exchanges, grouped experts, combine) through
the chunked pipeline with C chunks; C = 1 issues each exchange and waits for it at once (nothing overlapped: the
plain path's exposure), C >= 2 is parallel.a2a_overlap_chunks = C. Variants are interleaved round by round.
exposed_ms: host time spent issuing and waiting on the exchanges (CommTimer), forward + backward, slowest rank,
median over rounds: on gloo the communication the computation did not hide. plain_ms: the default
AllToAllDispatcher's layer time, for reference. Goal: exposed time with overlap <= half of C = 1's.
Shape legend: T tokens per rank, D hidden, F expert FFN width, E experts, C chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_env import cpu_env  # noqa: E402


def _max(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class ChunkedDispatcher:
    """AllToAllDispatcher's forward with the chunked pipeline for every C (C = 1: no overlap, every wait exposed)."""

    def __init__(self, group, num_experts: int, chunks: int):
        from moe_train.parallel.dispatcher import AllToAllDispatcher

        self.inner = AllToAllDispatcher(group, num_experts, overlap_chunks=chunks)
        self.chunks = chunks

    def __call__(self, x_TD, plan, experts):
        from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
        from moe_train.parallel.exchange import CountExchange
        from moe_train.parallel.overlap import chunk_order, overlapped_experts, reorder_permutation

        d = self.inner
        ex = CountExchange.run(plan.counts_E, d.group, d.ep_size, d.ep_rank)
        perm = build_permutation(plan.expert_idx_TK, d.num_experts, num_rows=ex.rows_sent)
        order_N, _ = chunk_order(ex.send_counts_E, self.chunks, x_TD.device, plan.counts_E)
        perm = reorder_permutation(perm, order_N)
        y_ND = overlapped_experts(permute(x_TD, perm), ex, experts, self.chunks)
        return unpermute_combine(y_ND, perm, plan.weight_TK, x_TD.shape[0])


def worker(args) -> None:
    from moe_train.config import ModelConfig, MoEConfig, ParallelConfig
    from moe_train.model.moe_layer import MoELayer
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.distributed import init_distributed
    from moe_train.parallel.overlap import CommTimer
    from moe_train.parallel.parallelize import shard_experts

    torch.set_num_threads(args.threads)
    world = int(os.environ["WORLD_SIZE"])
    ctx = init_distributed(ParallelConfig(ep=world), args.experts)
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                 moe=MoEConfig(num_experts=args.experts, top_k=2)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    shard_experts(layer.experts, ctx.ep_rank, ctx.ep_size)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(100 + ctx.rank))
    variants = {f"C{c}": ChunkedDispatcher(ctx.ep_group, args.experts, c) for c in args.chunks}
    variants["plain"] = AllToAllDispatcher(ctx.ep_group, args.experts)
    times = {n: [] for n in variants}
    exposed = {n: [] for n in variants}
    for i in range(args.warmup + args.iters):
        for name, disp in variants.items():
            layer.dispatcher = disp
            dist.barrier()
            t0 = time.perf_counter()
            with CommTimer.measure() as timer:
                y, _ = layer(x.detach().requires_grad_(True))
                y.sum().backward()
            dt, comm = _max(time.perf_counter() - t0), _max(timer.seconds)
            layer.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(dt)
                exposed[name].append(comm)
    if ctx.rank == 0:
        print(json.dumps({"bench": "env", **cpu_env(), "world": world, "backend": ctx.backend,
                          "threads_per_rank": args.threads, "dtype": "float32",
                          "shape": dict(T=args.tokens, D=args.hidden, F=args.ffn, E=args.experts, k=2)}), flush=True)
        base = statistics.median(exposed["C1"]) if "C1" in exposed else None
        for name in variants:
            med_exp = statistics.median(exposed[name]) if name != "plain" else None
            print(json.dumps({"bench": "a2a_overlap", "variant": name,
                              "layer_ms": round(1e3 * statistics.median(times[name]), 2),
                              "layer_min_ms": round(1e3 * min(times[name]), 2),
                              "layer_max_ms": round(1e3 * max(times[name]), 2),
                              "exposed_ms": None if med_exp is None else round(1e3 * med_exp, 2),
                              "exposed_min_ms": None if med_exp is None else round(1e3 * min(exposed[name]), 2),
                              "exposed_max_ms": None if med_exp is None else round(1e3 * max(exposed[name]), 2),
                              "exposed_vs_C1": None if med_exp is None or not base else round(med_exp / base, 3),
                              "goal": "exposed_vs_C1 <= 0.5 with overlap"}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    worker(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--chunks", default="1,2,4")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",")]
    assert 1 in args.chunks, "C = 1 (no overlap) is the baseline"
    if "WORLD_SIZE" in os.environ:  # under torchrun
        worker(args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
