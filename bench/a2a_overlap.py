"""Exposed all-to-all time of one expert-parallel MoE layer (with a shared expert and the identity null term), 2
gloo ranks spawned by this script (or any world under torchrun). One JSON object per line, rank 0 prints.

    python bench/a2a_overlap.py [--world 2 --tokens 4096 --hidden 256 --ffn 512 --experts 8 --chunks 1,2,4
                                 --shared 1024 --null identity --iters 9 --label after]

Variants (interleaved round by round): C1 = the AllToAllDispatcher's plain path (parallel.a2a_overlap_chunks = 1),
C >= 2 = the chunked pipeline (parallel/overlap.py). Each runs the whole layer forward + backward: router,
permutation, count exchange, row exchanges, grouped experts, combine, the Qwen2 gated shared expert (width
--shared; 0 = none) and the null term (--null identity: router null_experts with 4 null experts, null_kind
identity; zero = none; "null" on code older than that name). With the dispatcher's phases
(parallel/dispatcher.py) the layer computes the shared expert while the dispatch exchange travels and the null
term while the combine travels; before them both ran after the combine.
exposed_ms: host time spent issuing and waiting on the exchanges (CommTimer: parallel/collectives.py), forward +
backward, count exchange included, slowest rank, median over rounds: on gloo the communication the computation did
not hide. layer_ms: the layer's forward + backward, slowest rank. --label names the code under test in the JSON
(run the same script with PYTHONPATH=<other checkout> for a before / after comparison): on code whose plain
exchange is a blocking dist.all_to_all_single (before issue 25) the bench times that call itself, which is then
all exposed.
Shape legend: T tokens per rank, D hidden, F expert FFN width, Fs shared expert width, E experts, C chunks.
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


def _comm_timer():
    """CommTimer of the code under test; on code before the phased dispatcher, also times its blocking exchanges."""
    from moe_train.parallel import exchange, overlap

    if not hasattr(exchange, "start_rows"):  # before issue 25: exchange.py calls a blocking all_to_all_single
        real = exchange.all_to_all_single

        def timed(*a, **kw):
            with overlap.CommTimer.span():
                return real(*a, **kw)

        exchange.all_to_all_single = timed
    return overlap.CommTimer


def worker(args) -> None:
    from moe_train.config import ROUTERS, ModelConfig, MoEConfig, ParallelConfig
    from moe_train.model.moe_layer import MoELayer
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.distributed import init_distributed
    from moe_train.parallel.parallelize import shard_experts

    torch.set_num_threads(args.threads)
    CommTimer = _comm_timer()
    world = int(os.environ["WORLD_SIZE"])
    ctx = init_distributed(ParallelConfig(ep=world), args.experts)
    torch.manual_seed(0)
    router = "null_experts" if "null_experts" in ROUTERS else "null"  # the code under test may predate the name
    null = dict(router=router, num_null_experts=4, null_kind=args.null) if args.null != "zero" else {}
    layer = MoELayer(ModelConfig(hidden_size=args.hidden, intermediate_size=args.ffn,
                                 shared_expert_intermediate_size=args.shared,
                                 moe=MoEConfig(num_experts=args.experts, top_k=2, **null)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    shard_experts(layer.experts, ctx.ep_rank, ctx.ep_size)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(100 + ctx.rank))
    variants = {f"C{c}": AllToAllDispatcher(ctx.ep_group, args.experts, overlap_chunks=c) for c in args.chunks}
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
        print(json.dumps({"bench": "env", "label": args.label, **cpu_env(), "world": world, "backend": ctx.backend,
                          "threads_per_rank": args.threads, "dtype": "float32",
                          "shape": dict(T=args.tokens, D=args.hidden, F=args.ffn, Fs=args.shared, E=args.experts,
                                        k=2, null=args.null)}), flush=True)
        base = statistics.median(exposed["C1"])
        for name in variants:
            med_exp = statistics.median(exposed[name])
            print(json.dumps({"bench": "a2a_overlap", "label": args.label, "variant": name,
                              "layer_ms": round(1e3 * statistics.median(times[name]), 2),
                              "layer_min_ms": round(1e3 * min(times[name]), 2),
                              "layer_max_ms": round(1e3 * max(times[name]), 2),
                              "exposed_ms": round(1e3 * med_exp, 2),
                              "exposed_min_ms": round(1e3 * min(exposed[name]), 2),
                              "exposed_max_ms": round(1e3 * max(exposed[name]), 2),
                              "exposed_vs_C1": round(med_exp / base, 3) if base else None,
                              "rounds": len(times[name])}), flush=True)
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
    ap.add_argument("--shared", type=int, default=1024, help="gated shared expert width (0: none)")
    ap.add_argument("--null", default="identity", choices=("zero", "identity", "constant"),
                    help="null_kind of 4 null experts (zero: no null term)")
    ap.add_argument("--label", default="", help="names the code under test in the JSON lines")
    args = ap.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",")]
    if 1 not in args.chunks:
        raise ValueError("--chunks must include 1 (the plain path, the baseline of exposed_vs_C1)")
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
