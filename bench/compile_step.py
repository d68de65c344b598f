"""One training step (forward, loss, backward, AdamW) with compiled decoder blocks (train.compile,
moe_train/parallel/compile.py) against the same model eager, one process. Prints one JSON object per line.

    python bench/compile_step.py [--config configs/tiny_adamoe.yaml --precision fp32 --reps 7 --warmup 4]

Both models start from the same weights and see the same batches (a fixed cycle of --batches random batches of the
config's train.batch_size x train.seq_len). The compiled model's first --warmup steps carry the compilation (and
the recompiles while the routed row counts become dynamic): their time, minus the eager model's time for the same
steps, is reported as compile_s, apart from the step times. The timed steps are interleaved (eager, compiled,
eager, compiled, ...: bench/cpu_env.py round_robin) so load changes hit both; median, min, max and IQR over --reps
steps; speedup = the median over rounds of eager / compiled time. Dynamo's graph count before and after the timed
steps shows whether anything recompiled while timing. --precision bf16: autocast over fp32 masters (the trainer's
single-process bf16), in which the expert GEMMs stay inside the graphs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_train.config import load_config  # noqa: E402
from moe_train.model import build_model  # noqa: E402
from moe_train.model.loss import lm_loss, routing_losses  # noqa: E402
from moe_train.parallel.compile import apply_compile  # noqa: E402

from cpu_env import cpu_env, paired_ratio, round_robin  # noqa: E402


def make_step(model, cfg, batches, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    i = [0]

    def step() -> float:
        inputs, targets = batches[i[0] % len(batches)]
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, plans = model(inputs, return_plans=True)
        terms = routing_losses(plans, cfg.model.moe)
        loss = lm_loss(logits, targets) + terms["aux_loss"] + terms["z_loss"] + terms["entropy_loss"]
        loss.backward()
        opt.step()
        return loss.item()

    return step


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_adamoe.yaml")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    assert args.reps >= 5 and args.warmup >= 2, "at least 5 timed steps after at least 2 warm-up steps"
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"train.precision={args.precision}", "train.compile=true"])
    bf16 = args.precision == "bf16"
    print(json.dumps({"env": cpu_env(), "bench": "compile_step", "config": args.config,
                      "precision": args.precision, "reps": args.reps, "warmup": args.warmup}))

    torch.manual_seed(cfg.train.seed)
    eager = build_model(cfg.model)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, cfg.train, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    B, S, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    batches = [(ids[:, :-1], ids[:, 1:]) for ids in (torch.randint(0, V, (B, S + 1), generator=g)
                                                     for _ in range(args.batches))]
    steps = {"eager": make_step(eager, cfg, batches, bf16), "compiled": make_step(compiled, cfg, batches, bf16)}

    # warm-up: the compiled model's first steps compile; the same steps eager give the step time they also contain
    warm = {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        losses = [fn() for _ in range(args.warmup)]
        warm[name] = {"s": time.perf_counter() - t0, "losses": losses}
    graphs_before = graphs()
    print(json.dumps({"phase": "warmup", "steps": args.warmup, "compiled_warmup_s": round(warm["compiled"]["s"], 3),
                      "eager_warmup_s": round(warm["eager"]["s"], 3),
                      "compile_s": round(warm["compiled"]["s"] - warm["eager"]["s"], 3),
                      "graphs": graphs_before,
                      "max_loss_diff": max(abs(a - b) for a, b in zip(warm["compiled"]["losses"],
                                                                       warm["eager"]["losses"]))}))

    res = round_robin(steps, reps=args.reps, warmup=0)
    for name, r in res.items():
        print(json.dumps({"variant": name, "precision": args.precision, "tokens_per_step": B * S,
                          "median_ms": round(1e3 * r["median_s"], 2), "min_ms": round(1e3 * r["min_s"], 2),
                          "max_ms": round(1e3 * r["max_s"], 2), "iqr_ms": round(1e3 * r["iqr_s"], 2)}))
    print(json.dumps({"speedup_eager_over_compiled": round(paired_ratio(res, "eager", "compiled"), 3),
                      "graphs_after_timing": graphs(), "recompiled_while_timing": graphs() != graphs_before,
                      "load_avg_1m_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
