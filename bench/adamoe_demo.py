"""AdaMoE versus top-2 on the generated corpus, from the same initial checkpoint and the same tokens.

    1. pre-train a tiny top-2 model (configs/tiny_top2.yaml)                    -> base checkpoint
    2. continue it as top-2 for N steps                                          -> baseline
    3. continue it as AdaMoE (8 true + 16 null experts, k=4, FLOPs vs top-2)    -> AdaMoE (conversion on load)
    4. continue it as AdaMoE with 8 null experts and a compute budget (target true experts per token, PI control)
Prints one JSON line per run: validation loss, whole-model FLOPs versus top-2, true experts per token overall and
by difficulty label of the target token. Goal (issue): AdaMoE val loss <= top-2's with >= 15% fewer FLOPs, and
hard tokens (copy / arith / bracket) get more true experts than easy ones (filler / structure).

    python bench/adamoe_demo.py [--base-steps 400 --steps 300 --out runs/adamoe_demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_train.config import load_config
from moe_train.data import EASY_LABELS, HARD_LABELS, LABELS
from moe_train.train.trainer import train


def run(name: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config("configs/tiny_top2.yaml", [f"train.out_dir={out / name}", "train.log_every=100",
                                                 "train.tensorboard=false", "data.val_sequences=256", *overrides])
    rec = train(cfg)
    by_label = rec.get("val_true_experts_by_label", {})
    hard = [by_label[LABELS[k]] for k in HARD_LABELS if LABELS[k] in by_label]
    easy = [by_label[LABELS[k]] for k in EASY_LABELS if LABELS[k] in by_label]
    row = {"bench": "adamoe_demo", "run": name, "val_loss": round(rec["val_loss"], 4),
           "val_flops_vs_top2": round(rec["val_flops_vs_topk"], 4),
           "flops_reduction_pct": round(100 * (1 - rec["val_flops_vs_topk"]), 2),
           "true_experts_per_token": round(rec["val_true_experts_per_token"], 3),
           "true_experts_by_label": {k: round(v, 3) for k, v in by_label.items()},
           "hard_minus_easy": round(sum(hard) / len(hard) - sum(easy) / len(easy), 3) if hard and easy else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="runs/adamoe_demo")
    p.add_argument("--budget", type=float, default=1.5, help="target true experts/token of the budget run (m=8)")
    args = p.parse_args()
    out = Path(args.out)
    run("base_top2", [f"train.steps={args.base_steps}", "train.resume=false"], out)
    base = str(out / "base_top2" / "final" / "model.pt")
    common = [f"train.steps={args.steps}", f"train.init_from={base}", "train.warmup_steps=10", "train.lr=1.5e-3",
              "train.resume=false", "data.seed=77"]  # a new slice of the corpus, the same for every run
    top2 = run("top2", common, out)
    ada = run("adamoe", common + ["model.moe.router=null_experts", "model.moe.num_null_experts=16", "model.moe.top_k=4",
                                  "model.moe.baseline_top_k=2", "model.moe.aux_loss_coef=0.01"], out)
    # the paper's setting (m = 2n null experts, k = 4) and a compute-budget run (m = n, k = 4, target true experts)
    budget = run("adamoe_budget", common + [
        "model.moe.router=null_experts", "model.moe.num_null_experts=8", "model.moe.top_k=4", "model.moe.baseline_top_k=2",
        "model.moe.aux_loss_coef=0.001", f"model.moe.target_true_experts={args.budget}"], out)
    rows = [top2, ada, budget]
    for r in rows[1:]:
        print(json.dumps({"bench": "adamoe_demo", "compare": f"{r['run']} vs top2",
                          "val_loss_diff": round(r["val_loss"] - top2["val_loss"], 4),
                          "flops_reduction_pct": r["flops_reduction_pct"],
                          "goal_met": r["val_loss"] <= top2["val_loss"] and r["flops_reduction_pct"] >= 15
                          and (r["hard_minus_easy"] or 0) > 0}), flush=True)


if __name__ == "__main__":
    main()
