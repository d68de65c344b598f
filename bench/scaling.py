"""Scaling of the expert-parallel MoE layer: per-stage timers, whole layer steps, bytes, and the planner's predicted
curves for 8-64 H100s beside the measured CPU ones. JSON lines on stdout (and --out), PNG plots with --plots.

    python bench/scaling.py --out docs/planner_scaling.jsonl --plots docs/img        # spawns ep = 1, 2, 4 (gloo)

Per ep (world = ep, gloo, 1 thread per rank), variants (tokens per rank T, k, null share of the k picks) are
interleaved round by round (A B C, A B C, ...) and each reported as the median over rounds with min / max:
  stages  route, count exchange, permute, token all-to-all (+ regrouping by expert), experts, combine all-to-all
          (+ regrouping back), combine; the backward of each stage likewise (each stage is its own autograd graph,
          so its backward can be timed: the same ops the dispatcher runs, parallel/dispatcher.py, cut at the stage
          boundaries); the slowest rank's time per stage
  step    the real AllToAllDispatcher (or LocalDispatcher at ep 1) forward + backward, uncut: the slowest rank
  bytes   DispatchStats.bytes_sent_remote of the step, summed over ranks
Null picks are set on a fixed random share of the slots (weights renormalised over the remaining true picks, as the
null router does), so rows, bytes and expert work follow the true assignments.
Weak scaling: T per rank fixed, ep grows; efficiency = step time at ep 1 / step time at ep.
Planner curves: moe-train plan of configs/mixtral_8x22b_adamoe.yaml (ep 8) at 8, 16, 32, 64 H100s with the
config's per-GPU work (global batch 4 x world: 1 sequence x 4 micro-batches per GPU), and its bytes and step time
against true experts per token at 16.
Shape legend: T tokens per rank, D hidden, F expert FFN width, E experts, K slots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

STAGES = ("route", "count_exchange", "permute", "token_a2a", "experts", "combine_a2a", "combine")


def cpu_info() -> dict:
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "isa": sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}),
            "torch": torch.__version__, "dtype": "float32"}


class _Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return out


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def staged_step(layer, x_TD: torch.Tensor, keep_TK: torch.Tensor, group, ep: int, ep_rank: int) -> dict:
    """One forward + backward cut into the dispatcher's stages; seconds per stage (fwd_* and bwd_*)."""
    from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
    from moe_train.parallel.exchange import CountExchange

    tm, E = _Timer(), layer.experts.num_experts * ep
    x = _leaf(x_TD)
    plan = tm("fwd_route", lambda: _null_plan(layer.router(x), keep_TK, E))
    w = _leaf(plan.weight_TK)  # the router's graph ends here: its backward is timed on its own
    ex = tm("fwd_count_exchange", CountExchange.run, plan.counts_E, group, ep, ep_rank)
    perm = tm("fwd_permute", build_permutation, plan.expert_idx_TK, E, "torch", ex.rows_sent)
    x_nd = tm("fwd_permute", permute, x, perm, "torch")
    a = _leaf(x_nd)
    x_rd = tm("fwd_token_a2a", lambda: ex.to_expert_major(ex.dispatch_rows(a)))
    b = _leaf(x_rd)
    y_rd = tm("fwd_experts", layer.experts, b, ex.recv_counts_dev_PL.sum(0))
    c = _leaf(y_rd)
    y_nd = tm("fwd_combine_a2a", lambda: ex.combine_rows(ex.from_expert_major(c)))
    d = _leaf(y_nd)
    y = tm("fwd_combine", unpermute_combine, d, perm, w, x.shape[0], "torch")
    g = torch.ones_like(y)
    tm("bwd_combine", torch.autograd.backward, y, g)
    tm("bwd_combine_a2a", torch.autograd.backward, y_nd, d.grad.contiguous())
    tm("bwd_experts", torch.autograd.backward, y_rd, c.grad.contiguous())
    tm("bwd_token_a2a", torch.autograd.backward, x_rd, b.grad.contiguous())
    tm("bwd_permute", torch.autograd.backward, x_nd, a.grad.contiguous())
    tm("bwd_route", torch.autograd.backward, plan.weight_TK, w.grad.contiguous())
    layer.zero_grad(set_to_none=True)
    return tm.t


def _null_plan(plan, keep_TK: torch.Tensor, E: int):
    from moe_train.routing.plan import counts_from_idx
    from moe_train.routing.topk import renormalize

    plan.expert_idx_TK = torch.where(keep_TK, plan.expert_idx_TK, -1)
    plan.weight_TK = renormalize(plan.weight_TK, keep_TK)
    plan.counts_E = counts_from_idx(plan.expert_idx_TK, E)
    return plan


def whole_step(layer, x_TD: torch.Tensor, keep_TK: torch.Tensor, E: int):
    x = _leaf(x_TD)
    plan = _null_plan(layer.router(x), keep_TK, E)
    y = layer.dispatcher(x, plan, layer.experts)
    y.backward(torch.ones_like(y))
    layer.zero_grad(set_to_none=True)
    return getattr(layer.dispatcher, "last", None)


def _keep(T: int, K: int, null: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(T * K, dtype=torch.bool)
    keep[torch.randperm(T * K, generator=g)[:round(null * T * K)]] = False
    return keep.view(T, K)


def run_rank(args_dict: dict) -> list[dict]:
    """On every rank of one ep world: all variants interleaved; rank 0 returns the rows."""
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts

    a = argparse.Namespace(**args_dict)
    ep = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = dist.group.WORLD if ep > 1 else None
    layers, data = {}, {}
    for (T, k, null) in a.variants:
        if k not in layers:
            torch.manual_seed(0)
            layer = MoELayer(ModelConfig(hidden_size=a.hidden, intermediate_size=a.ffn,
                                         moe=MoEConfig(router="topk", num_experts=a.experts, top_k=k)))
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(std=0.02)
            if ep > 1:
                shard_experts(layer.experts, rank, ep)
                layer.dispatcher = AllToAllDispatcher(group, a.experts, "torch")
            layers[k] = layer
        g = torch.Generator().manual_seed(100 + rank)
        data[(T, k, null)] = (torch.randn(T, a.hidden, generator=g), _keep(T, k, null, seed=rank))
    times = {v: {"step": []} for v in a.variants}
    stats = {}
    for rnd in range(a.warmup + a.rounds):
        for v in a.variants:  # interleaved
            layer, (x, keep) = layers[v[1]], data[v]
            if ep > 1:
                dist.barrier()
            t0 = time.perf_counter()
            stats[v] = whole_step(layer, x, keep, a.experts)
            step = time.perf_counter() - t0
            if ep > 1:
                dist.barrier()
            st = staged_step(layer, x, keep, group, ep, rank)
            vals = torch.tensor([step] + [st.get(f"{d}_{s}", 0.0) for d in ("fwd", "bwd") for s in STAGES],
                                dtype=torch.float64)
            if ep > 1:
                dist.all_reduce(vals, op=dist.ReduceOp.MAX)  # the slowest rank per figure
            if rnd >= a.warmup:
                times[v]["step"].append(float(vals[0]))
                for i, name in enumerate(f"{d}_{s}" for d in ("fwd", "bwd") for s in STAGES):
                    times[v].setdefault(name, []).append(float(vals[1 + i]))
    rows = []
    for v in a.variants:
        T, k, null = v
        s = stats[v]
        sent = torch.tensor([s.rows_sent if s else T * k - round(null * T * k),
                             s.bytes_sent_remote if s else 0], dtype=torch.float64)
        if ep > 1:
            dist.all_reduce(sent)
        med = {name: statistics.median(ts) for name, ts in times[v].items()}
        rows.append({"bench": "scaling", "ep": ep, "tokens_per_rank": T, "k": k, "null_share": null,
                     "true_experts_per_token": sent[0].item() / (T * ep),
                     "bytes_sent_remote_all_ranks": int(sent[1]), "step_ms": 1e3 * med["step"],
                     "step_ms_min": 1e3 * min(times[v]["step"]), "step_ms_max": 1e3 * max(times[v]["step"]),
                     "tokens_per_s": T * ep / med["step"],
                     "stages_ms": {n: 1e3 * t for n, t in med.items() if n != "step"}})
    return rows if rank == 0 else []


def _spawn_entry(rank: int, world: int, port: int, args_dict: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = run_rank(args_dict)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure(args, ep: int) -> list[dict]:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    d = vars(args).copy()
    if ep == 1:
        torch.set_num_threads(1)
        return run_rank(d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_spawn_entry, args=(ep, port, d, out), nprocs=ep, join=True)
        with open(out) as f:
            return json.load(f)


def planner_curves(worlds: list[int], true_experts: list[float]) -> list[dict]:
    """moe-train plan of the Mixtral-8x22B AdaMoE config on H100s: weak scaling over worlds, and true experts."""
    from moe_train.config import load_config
    from moe_train.planner import make_plan, resolve_cluster

    rows = []
    for world in worlds:
        # weak scaling: the config's per-GPU work (1 sequence x 4 micro-batches) at every world size
        cfg = load_config("configs/mixtral_8x22b_adamoe.yaml",
                          [f"parallel.world_size={world}", f"train.batch_size={4 * world}"])
        p = make_plan(cfg, resolve_cluster(cfg, None, 8, "h100"), "train", advise=False)
        rows.append({"bench": "planner", "curve": "world", "world": world, "step_s": p["time"]["serial_s"],
                     "roofline_s": p["time"]["roofline_s"], "bound_by": p["time"]["bound_by"],
                     "tokens_per_s_per_gpu": p["tokens"]["tokens_per_step"] / p["time"]["serial_s"],
                     "peak_gib": p["memory"]["peak"] / 2**30, "mfu": p["time"]["mfu"]})
    cfg = load_config("configs/mixtral_8x22b_adamoe.yaml")
    for k in true_experts:
        p = make_plan(cfg, resolve_cluster(cfg, None, 8, "h100"), "train", true_experts=k, advise=False)
        tr = p["traffic"]
        rows.append({"bench": "planner", "curve": "true_experts", "world": 16, "true_experts_per_token": k,
                     "a2a_bytes_per_gpu": tr["a2a_intra"] + tr["a2a_inter"], "step_s": p["time"]["serial_s"],
                     "compute_s": p["time"]["terms"]["compute"], "a2a_s": p["time"]["terms"]["a2a_nvlink"]
                     + p["time"]["terms"]["a2a_ib"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", default="1,2,4")
    ap.add_argument("--variants", default="2048:2:0,2048:2:0.25,2048:2:0.5,2048:4:0,2048:4:0.5,512:2:0",
                    help="T:k:null_share, comma separated")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--planner-worlds", default="8,16,32,64")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--plots", default=None, help="folder for the PNG plots (matplotlib: pip install -e .[bench])")
    args = ap.parse_args()
    args.variants = [(int(t), int(k), float(n)) for t, k, n in (v.split(":") for v in args.variants.split(","))]
    rows = [{"bench": "scaling", "machine": cpu_info(), "hidden": args.hidden, "ffn": args.ffn,
             "experts": args.experts, "rounds": args.rounds, "threads_per_rank": 1,
             "note": "shared CPU: other jobs ran meanwhile; medians of interleaved rounds with min/max"}]
    emit(rows[0], args.out, "w")
    for ep in (int(e) for e in args.eps.split(",")):
        for r in measure(args, ep):
            rows.append(r)
            emit(r, args.out)
    for r in planner_curves([int(w) for w in args.planner_worlds.split(",")], [2.0, 1.75, 1.5, 1.25, 1.0]):
        rows.append(r)
        emit(r, args.out)
    if args.plots:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from scaling_plots import plot_all  # matplotlib only when plotting

        for path in plot_all(rows, args.plots):
            print(f"wrote {path}", file=sys.stderr)


def emit(row: dict, out, mode: str = "a") -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, mode) as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
