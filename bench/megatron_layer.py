"""Megatron-Core's MoELayer as a peer, one process, forward + backward, at the shapes of bench/moe_layer.py.

    python bench/megatron_layer.py [--tokens 4096 --hidden 256 --ffn 512 --experts 8 --reps 7]

Variants, all inside Megatron-Core's MoELayer with the same SequentialMLP experts (local spec, fp32, CPU):
  megatron_top2        Megatron's TopKRouter + its allgather dispatcher (the baseline; its CUDA-only calls are
                       patched here as in tests/megatron_workers.py: te_general_gemm, torch.cuda.current_device)
  ours_top2            VariableKRouter(topk) + VariableKMoELayer (our variable-k all-to-all)
  ours_null25/50       VariableKRouter(adamoe: 8 true + 8 null experts, k = 2) + VariableKMoELayer, 25 / 50 % of
                       the picks null (a constant input feature's null-gate weight set by bisection)
  megatron_disp_null50 our null-expert router with Megatron's allgather dispatcher (exact for variable k)
  moe_train_top2       moe_train's own MoELayer (grouped_mm), for context
Variants are interleaved rep by rep (the machine is shared) and the median is reported. JSON lines:
time_ratio = time / megatron_top2 time; assign_ratio = true assignments / (T * 2);
time_ratio_paired = median over reps of (time / megatron_top2 time in the same rep), steadier under load;
saved_fraction = (1 - paired time / ours_top2 time) / (1 - assign_ratio): the share of the avoided assignments
that became avoided time (goal: close to 1; Megatron's router cannot skip any).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def setup():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import megatron.core.transformer.moe.moe_utils as mu

    mu.te_general_gemm = None  # 0.16.1 without Transformer Engine (benchmark harness only)
    torch.cuda.current_device = lambda: "cpu"  # Megatron's TopKRouter moves its weight there
    from megatron.core.process_groups_config import ProcessGroupCollection

    g = dist.group.WORLD
    return ProcessGroupCollection(tp=g, cp=g, tp_cp=g, expt_tp=g, expt_dp=g, pp=g, ep=g, tp_ep=g, dp=g, tp_dp_cp=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pg = setup()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer as OurMoELayer
    from moe_train.parallel.megatron import VariableKMoELayer, VariableKRouter, adamoe, topk

    E, T, Dh = args.experts, args.tokens, args.hidden
    cfg = TransformerConfig(num_layers=1, hidden_size=Dh, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2,
                            moe_ffn_hidden_size=args.ffn, ffn_hidden_size=args.ffn, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, moe_token_dispatcher_type="allgather",
                            use_cpu_initialization=True, params_dtype=torch.float32, bf16=False)
    subs = get_gpt_layer_local_spec(num_experts=E).submodules.mlp.submodules

    def build(router=None, ours=False):
        cls = VariableKMoELayer if ours else MoELayer
        layer = cls(cfg, subs if router is None else dataclasses.replace(subs, router=router), layer_number=1,
                    pg_collection=pg)
        layer.set_layer_number(1)
        return layer

    torch.manual_seed(0)
    base = build()
    with torch.no_grad():
        for prm in base.parameters():
            prm.normal_(std=0.02)
    x = torch.randn(T, 1, Dh)
    x[..., 0] = 1.0

    def clone_into(layer):
        missing, unexpected = layer.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all("null_weight" in k for k in missing), (missing, unexpected)
        return layer

    null_router = VariableKRouter.builder(adamoe(E, top_k=2))
    variants = {"megatron_top2": base, "ours_top2": clone_into(build(VariableKRouter.builder(topk()), ours=True))}
    for frac in (0.25, 0.5):
        variants[f"ours_null{int(frac * 100)}"] = clone_into(build(null_router, ours=True))
    variants["megatron_disp_null50"] = clone_into(build(VariableKRouter.builder(
        adamoe(E, top_k=2, dispatcher="megatron"))))
    torch.manual_seed(0)
    mt = OurMoELayer(ModelConfig(hidden_size=Dh, intermediate_size=args.ffn,
                                 moe=MoEConfig(num_experts=E, top_k=2, gemm_backend="grouped_mm")))
    with torch.no_grad():
        for prm in mt.parameters():
            prm.normal_(std=0.02)
    variants["moe_train_top2"] = mt

    @torch.no_grad()
    def set_null_fraction(layer, target):
        lo, hi, frac = -20.0, 20.0, 0.0
        null_w = layer.router.null_weight
        base_w = null_w[:, 0].clone()
        for _ in range(40):
            mid = (lo + hi) / 2
            null_w[:, 0] = base_w + mid
            _, rmap = layer.router(x)
            frac = 1 - rmap.sum().item() / (T * 2)
            lo, hi = (mid, hi) if frac < target else (lo, mid)
        return frac

    fractions = {"megatron_top2": 0.0, "ours_top2": 0.0, "moe_train_top2": 0.0}
    for name, target in (("ours_null25", 0.25), ("ours_null50", 0.5), ("megatron_disp_null50", 0.5)):
        fractions[name] = set_null_fraction(variants[name], target)

    def step(layer):
        xx = x.detach().requires_grad_()
        y = layer(xx if not isinstance(layer, OurMoELayer) else xx.reshape(1, T, Dh))[0]
        y.backward(torch.ones_like(y))

    times = {name: [] for name in variants}
    for layer in variants.values():  # warm-up
        step(layer)
        step(layer)
    for _ in range(args.reps):
        for name, layer in variants.items():
            start = time.perf_counter()
            step(layer)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def paired(name, base):
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    common = {"bench": "megatron_layer", "tokens": T, "hidden": Dh, "ffn": args.ffn, "experts": E,
              "threads": torch.get_num_threads(), "reps": args.reps, "torch": torch.__version__,
              "megatron_core": __import__("megatron.core").core.__version__,
              "cpu": platform.processor() or platform.machine()}
    for name in variants:
        assign = round((1 - fractions[name]) * T * 2)
        assign_ratio = assign / (T * 2)
        row = {**common, "variant": name, "null_fraction": round(fractions[name], 4), "true_assignments": assign,
               "time_s": round(med[name], 5), "time_min_s": round(min(times[name]), 5),
               "time_ratio": round(med[name] / med["megatron_top2"], 4), "assign_ratio": round(assign_ratio, 4),
               # the same ratio within each rep (consecutive runs share the machine's load), then the median
               "time_ratio_paired": round(paired(name, "megatron_top2"), 4)}
        if assign_ratio < 0.999:
            row["saved_fraction"] = round((1 - paired(name, "ours_top2")) / (1 - assign_ratio), 3)
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
