"""The `moe-train` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

from moe_train.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from moe_train.config import load_config
    from moe_train.train.trainer import train

    cfg = load_config(args.config, args.set)
    train(cfg)


def _convert(args: argparse.Namespace) -> None:
    from moe_train.io.convert import convert_to_adamoe

    dst = convert_to_adamoe(args.src, args.dst, num_null_experts=args.num_null_experts, top_k=args.top_k,
                            baseline_top_k=args.baseline_top_k)
    print(f"wrote AdaMoE model to {dst}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny_adamoe.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=10 (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("convert", help="add AdaMoE null experts to a Hugging Face Mixtral / Qwen2-MoE checkpoint")
    p.add_argument("--src", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--num-null-experts", type=int, required=True, help="m null experts (a multiple of n)")
    p.add_argument("--top-k", type=int, required=True, help="new k over true + null experts (AdaMoE Mixtral: 4)")
    p.add_argument("--baseline-top-k", type=int, default=None, help="FLOPs baseline k (default: the model's k)")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"moe-train: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"moe-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
