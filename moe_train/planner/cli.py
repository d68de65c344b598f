"""``moe-train plan``: the subcommand's arguments and entry (moe_train/cli.py adds the parser)."""

from __future__ import annotations

import argparse

from moe_train.planner.hardware import GPUS


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_plan_parser(sub, at_least) -> None:
    p = sub.add_parser("plan", help="per-GPU memory, bytes, step time and bottleneck of a config on a cluster, from "
                                    "the real model and sharding on the meta device (no GPU needed)")
    p.add_argument("--config", required=True,
                   help="YAML config (train or adak), e.g. configs/mixtral_8x22b_adamoe.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--nodes", type=at_least(1), default=None,
                   help="nodes (default: parallel.world_size / --gpus-per-node, else one ep group)")
    p.add_argument("--gpus-per-node", type=at_least(1), default=None, help="GPUs per node (default 8)")
    p.add_argument("--gpu", default="h100", help=f"one of {sorted(GPUS)} (moe_train/planner/hardware.py)")
    p.add_argument("--job", choices=("auto", "train", "adak"), default="auto",
                   help="auto: adak when the config file has an adak: section, else train")
    p.add_argument("--true-experts", type=_positive_float, default=None,
                   help="measured true experts per token per layer (metrics.jsonl true_experts_per_token) for FLOPs, "
                        "bytes and time; default: the budget target, else the top-k baseline")
    p.add_argument("--imbalance", type=_positive_float, default=1.0,
                   help="rows the busiest rank's experts receive over the mean (memory; default 1.0 = balanced)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of the table")
    p.set_defaults(func=run_plan)


def job_of(config_path: str, job: str) -> str:
    if job != "auto":
        return job
    import yaml

    with open(config_path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return "adak" if isinstance(data, dict) and "adak" in data else "train"


def run_plan(args: argparse.Namespace) -> None:
    import json

    from moe_train.config import load_config
    from moe_train.planner import make_plan, resolve_cluster
    from moe_train.planner.report import render

    cfg = load_config(args.config, args.set)
    job = job_of(args.config, args.job)
    cluster = resolve_cluster(cfg, args.nodes, args.gpus_per_node, args.gpu)
    plan = make_plan(cfg, cluster, job, args.true_experts, args.imbalance)
    print(json.dumps(plan) if args.json else render(plan))
