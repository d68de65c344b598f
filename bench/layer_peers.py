"""One MoE layer, one process, forward + backward, beside its peers at the same shape, fp32 and bf16 (issue 14).
Prints one JSON object per line: first the machine (CPU model and flags, torch capability, threads, load).

    python bench/layer_peers.py [--tokens 4096 --hidden 256 --ffn 512 --experts 8 --reps 9 --dtypes fp32,bf16]
                                [--threads 1] [--peers transformers,megatron,deepspeed]

Variants, interleaved round-robin (A B C ..., A B C ...), median and spread (IQR, min, max) over rounds:
  ours_top2            moe_train MoELayer, top-2 (router -> sort-free permutation -> grouped GEMM -> gather combine)
  ours_null25/50       8 true + 8 null experts, k = 2, 25 / 50 % of the picks null (bisection, bench/moe_layer.py)
  transformers         MixtralSparseMoeBlock (transformers 5.x, eager experts)
  megatron             Megatron-Core 0.16.1 MoELayer, allgather dispatcher, SequentialMLP (bench/megatron_layer.py)
  deepspeed            DeepSpeed-MoE (deepspeed.moe.layer.MoE, ep 1, top-2 gate, no token dropping)
Each module is cast to the dtype (bf16: parameters and activations in bf16, no fp32 masters, as a peer would run).
vs_ours_top2 = median over rounds of time / ours_top2 time in the same round; saved_fraction =
(1 - time ratio) / (1 - assignment ratio), goal >= 0.95.
Then, for ours: the router's share of the layer FORWARD (router alone vs whole layer, goal <= 10 %), and the
unpermute + combine against a copy of the same bytes (N rows read + T rows written; goal >= 0.8), beside the previous
index_add_ formulation.
Shape legend: T tokens, D hidden, F expert FFN width, E experts, N true assignments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_env import cpu_env, paired_ratio, round_robin  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def ours(args, router: str, null_frac: float, x_TD: torch.Tensor):
    from moe_layer import make_layer, set_null_fraction

    layer = make_layer(args, router)
    frac = 0.0
    if router == "null_experts":
        frac = set_null_fraction(layer, x_TD, null_frac if null_frac else 1e-9)
    return layer, frac


def transformers_block(args):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                        num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    return MixtralSparseMoeBlock(cfg)


def megatron_layer(args, pg):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=4,
                            num_moe_experts=args.experts, moe_router_topk=2, moe_ffn_hidden_size=args.ffn,
                            ffn_hidden_size=args.ffn, gated_linear_unit=True, activation_func=F.silu,
                            add_bias_linear=False, moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
                            params_dtype=torch.float32, bf16=False)
    subs = get_gpt_layer_local_spec(num_experts=args.experts).submodules.mlp.submodules
    layer = MoELayer(cfg, subs, layer_number=1, pg_collection=pg)
    layer.set_layer_number(1)
    return layer


def deepspeed_moe(args):
    import deepspeed
    from deepspeed.moe.layer import MoE

    from moe_train.model.experts import SwiGLU

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the 1-rank group of megatron_layer.setup()
    torch.manual_seed(0)
    return MoE(hidden_size=args.hidden, expert=SwiGLU(args.hidden, args.ffn), num_experts=args.experts, ep_size=1,
               k=2, capacity_factor=1.0, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)


def step_fn(module, x, layout: str):
    """fwd + bwd of one module; layout: how the peer takes [T, D] tokens."""
    T, D = x.shape
    shaped = {"BSD": x.reshape(1, T, D), "SBD": x.reshape(T, 1, D)}[layout]

    def run():
        xx = shaped.detach().requires_grad_()
        y = module(xx)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))
    return run


def build_variants(args, dtype, x_TD, pg) -> tuple[dict, dict]:
    mods, assign = {}, {}
    for name, router, frac in (("ours_top2", "topk", 0.0), ("ours_null25", "null_experts", 0.25), ("ours_null50", "null_experts", 0.5)):
        layer, got = ours(args, router, frac, x_TD)
        with torch.no_grad():
            assign[name] = int(layer.router(x_TD).counts_E.sum())
        mods[name] = (layer.to(dtype), "BSD")
    builders = {"transformers": (lambda: transformers_block(args), "BSD"),
                "megatron": (lambda: megatron_layer(args, pg), "SBD"),
                "deepspeed": (lambda: deepspeed_moe(args), "BSD")}
    for name in args.peers.split(","):
        if not name:
            continue
        build, layout = builders[name]
        try:
            m = build()
            with torch.no_grad():
                for prm in m.parameters():
                    prm.normal_(std=0.02)
            m = m.to(dtype)
            step_fn(m, x_TD.to(dtype), layout)()  # fails here, not mid-run, if this peer cannot run
            mods[name] = (m, layout)
            assign[name] = x_TD.shape[0] * 2
        except Exception as e:  # a peer this environment cannot run: say so, keep the others
            emit({"bench": "layer_peers", "variant": name, "dtype": str(dtype), "error": repr(e)[:300]})
    return mods, assign


def bench_dtype(args, dtype_name: str, pg) -> None:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden)
    x[:, 0] = 1.0
    mods, assign = build_variants(args, dtype, x, pg)
    xd = x.to(dtype)
    res = round_robin({n: step_fn(m, xd, lay) for n, (m, lay) in mods.items()}, args.reps, warmup=args.warmup)
    base = "ours_top2"
    for name, r in res.items():
        ratio = paired_ratio(res, name, base)
        a_ratio = assign[name] / assign[base]
        row = {"bench": "layer_peers", "dtype": dtype_name, "variant": name, "tokens": args.tokens,
               "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "true_assignments": assign[name],
               "median_ms": round(1e3 * r["median_s"], 2), "iqr_ms": round(1e3 * r["iqr_s"], 2),
               "min_ms": round(1e3 * r["min_s"], 2), "max_ms": round(1e3 * r["max_s"], 2),
               "vs_ours_top2": round(ratio, 4), "assign_ratio": round(a_ratio, 4)}
        if name.startswith("ours_null") and a_ratio < 0.999:
            row["saved_fraction"] = round((1 - ratio) / (1 - a_ratio), 3)
        if not name.startswith("ours"):
            row["ours_top2_over_peer"] = round(1 / ratio, 4)
        emit(row)
    routing_share(args, dtype_name, mods, xd)
    combine_vs_copy(args, dtype_name, mods["ours_top2"][0], xd)


def routing_share(args, dtype_name, mods, xd) -> None:
    """Router forward alone vs the whole layer forward (autograd recording on, as in training)."""
    for name in ("ours_top2", "ours_null50"):
        layer = mods[name][0]
        x3 = xd.reshape(1, *xd.shape)
        res = round_robin({"layer_fwd": lambda: layer(x3), "router_fwd": lambda: layer.router(xd)}, args.reps)
        emit({"bench": "routing_share", "dtype": dtype_name, "variant": name,
              "layer_fwd_ms": round(1e3 * res["layer_fwd"]["median_s"], 3),
              "router_fwd_ms": round(1e3 * res["router_fwd"]["median_s"], 3),
              "router_share": round(paired_ratio(res, "router_fwd", "layer_fwd"), 4), "goal": "<= 0.10"})


def combine_vs_copy(args, dtype_name, layer, xd) -> None:
    P = importlib.import_module("moe_train.kernels.permute")
    with torch.no_grad():
        plan = layer.router(xd)
    perm = P.build_permutation(plan.expert_idx_TK, args.experts, backend="torch")
    T, N, D = xd.shape[0], perm.num_rows, xd.shape[1]
    y = torch.randn(N, D, dtype=xd.dtype)
    w = plan.weight_TK.detach()
    nbytes = (N + T) * D * y.element_size()
    src = torch.randn(nbytes // 2 // y.element_size(), dtype=y.dtype)

    def index_add():  # the previous torch formulation, for comparison
        w_N = w.reshape(-1).index_select(0, perm.slot_N).to(y.dtype)
        return y.new_zeros(T, D).index_add_(0, perm.token_N, y * w_N[:, None])

    res = round_robin({"memcpy": lambda: src.clone(), "gather_combine": lambda: P.unpermute_combine(
        y, perm, w, T, backend="torch"), "index_add_previous": index_add}, max(2 * args.reps + 1, 31))
    emit({"bench": "combine_vs_copy", "dtype": dtype_name, "T": T, "N": N, "D": D, "bytes": nbytes,
          **{f"{n}_ms": round(1e3 * r["median_s"], 4) for n, r in res.items()},
          "gather_combine_vs_memcpy": round(1 / paired_ratio(res, "gather_combine", "memcpy"), 3),
          "index_add_previous_vs_memcpy": round(1 / paired_ratio(res, "index_add_previous", "memcpy"), 3),
          # best round of each: what the op costs when the shared machine leaves it alone
          "gather_combine_vs_memcpy_best": round(res["memcpy"]["min_s"] / res["gather_combine"]["min_s"], 3),
          "index_add_previous_vs_memcpy_best": round(res["memcpy"]["min_s"] / res["index_add_previous"]["min_s"], 3),
          "goal": ">= 0.8"})


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    ap.add_argument("--peers", default="transformers,megatron,deepspeed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on "
                    "a shared machine (OpenMP barriers stall when the cores are oversubscribed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_layer import setup

    pg = setup()  # a 1-rank gloo group + Megatron's CPU patches (harness only)
    emit({"bench": "env", **cpu_env(), "shape": dict(T=args.tokens, D=args.hidden, F=args.ffn, E=args.experts, k=2),
          "reps": args.reps})
    for d in args.dtypes.split(","):
        bench_dtype(args, d, pg)


if __name__ == "__main__":
    main()
