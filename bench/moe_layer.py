"""One MoE layer, one process, forward + backward: top-2 versus null experts at several true-expert loads, and
transformers' MixtralSparseMoeBlock at the same shape as a peer. Prints one JSON object per line.

    python bench/moe_layer.py [--tokens 4096 --hidden 256 --ffn 512 --experts 8 --reps 7]

Null-expert rows use k=2 over 8 true + 8 null experts; the null fraction of picks is set by a constant input
feature whose null-gate weight is found by bisection, so the loads are exact targets, not accidents.
time_ratio = time / top-2 time; assign_ratio = true assignments / top-2 assignments;
saved_fraction = (1 - time_ratio) / (1 - assign_ratio): the share of the saved assignments that became saved time
(goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.moe_layer import MoELayer


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_layer(args, router: str, gemm_backend: str = "auto") -> MoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(router=router, num_experts=args.experts, top_k=2, gemm_backend=gemm_backend,
                    num_null_experts=args.experts if router == "null_experts" else 0)
    layer = MoELayer(ModelConfig(hidden_size=args.hidden, intermediate_size=args.ffn, moe=moe))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    return layer


@torch.no_grad()
def set_null_fraction(layer: MoELayer, x_TD: torch.Tensor, target: float) -> float:
    """Bisects the null-gate weight on feature 0 (held at 1.0 in x) until the null share of picks hits target."""
    lo, hi = -20.0, 20.0
    frac = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        layer.router.null_gate.weight[:, 0] = mid
        plan = layer.router(x_TD)
        frac = float((plan.expert_idx_TK < 0).float().mean())
        lo, hi = (mid, hi) if frac < target else (lo, mid)
    return frac


def fwd_bwd(layer, x):
    def run():
        xx = x.detach().requires_grad_()
        y = layer(xx)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.hidden)
    x[..., 0] = 1.0
    common = {"bench": "moe_layer", "tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn,
              "experts": args.experts, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine()}

    base_assign = args.tokens * 2
    results = {}
    for backend in ("grouped_mm", "loop"):
        top2 = make_layer(args, "topk", backend)
        t_top2 = timed(fwd_bwd(top2, x), args.reps)
        results[backend] = t_top2
        print(json.dumps({**common, "variant": "top2", "gemm": backend, "null_fraction": 0.0,
                          "true_assignments": base_assign, "time_s": round(t_top2, 5)}), flush=True)
        for target in (0.0, 0.25, 0.5):
            layer = make_layer(args, "null_experts", backend)
            frac = set_null_fraction(layer, x.reshape(-1, args.hidden), target) if target else \
                set_null_fraction(layer, x.reshape(-1, args.hidden), 1e-9)
            plan = layer.router(x.reshape(-1, args.hidden))
            assign = int(plan.counts_E.sum())
            t = timed(fwd_bwd(layer, x), args.reps)
            time_ratio, assign_ratio = t / t_top2, assign / base_assign
            saved = (1 - time_ratio) / (1 - assign_ratio) if assign_ratio < 0.999 else None
            print(json.dumps({**common, "variant": "null_experts", "gemm": backend, "null_fraction": round(frac, 4),
                              "true_assignments": assign, "time_s": round(t, 5),
                              "time_ratio": round(time_ratio, 4), "assign_ratio": round(assign_ratio, 4),
                              "saved_fraction": None if saved is None else round(saved, 3)}), flush=True)

    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print(json.dumps({**common, "variant": "transformers_mixtral", "skipped": "transformers not installed"}))
        return
    for impl in ("eager", "grouped_mm"):
        hf_cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                               num_experts_per_tok=2)
        hf_cfg._experts_implementation = impl
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(hf_cfg)
        with torch.no_grad():
            for prm in block.parameters():
                prm.normal_(std=0.02)
        try:
            t = timed(fwd_bwd(block, x), args.reps)
        except Exception as e:  # an implementation this transformers build cannot run on CPU
            print(json.dumps({**common, "variant": "transformers_mixtral", "impl": impl, "error": repr(e)[:200]}))
            continue
        print(json.dumps({**common, "variant": "transformers_mixtral", "impl": impl, "time_s": round(t, 5),
                          "ours_top2_grouped_mm_over_peer": round(results["grouped_mm"] / t, 4)}), flush=True)


if __name__ == "__main__":
    main()
