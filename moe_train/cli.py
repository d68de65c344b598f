"""The `moe-train` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

from moe_train.config import CORPORA, NULL_KINDS, NULL_TIE_BREAKS, ConfigError


def _train(args: argparse.Namespace) -> None:
    import os

    from moe_train.config import load_config
    from moe_train.parallel.launch import apply_launch_env, topology_from_env

    if args.miniature and not args.dry_run:
        from moe_train.miniature import run_miniature

        apply_launch_env()
        run_miniature(args.config, args.set, "train")
        return
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        topo = topology_from_env(os.environ, cfg.parallel.ep, cfg.model.moe.num_experts, args.procs_per_node,
                                 args.nnodes)
        print(topo.describe())
        return
    apply_launch_env()  # mpirun / srun variables -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    from moe_train.preflight import check_train_inputs

    check_train_inputs(cfg, os.environ, overwrite=args.overwrite)  # every input, before process groups and model
    from moe_train.train.trainer import train

    train(cfg)


def _convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from moe_train.io.convert import convert_to_adamoe

    if Path(args.dst).exists() and not args.overwrite and Path(args.dst).resolve() != Path(args.src).resolve():
        raise ValueError(f"--dst {args.dst!r} already exists; convert refuses to replace it: choose a new folder or "
                         f"pass --overwrite")
    dst = convert_to_adamoe(args.src, args.dst, num_null_experts=args.num_null_experts, top_k=args.top_k,
                            baseline_top_k=args.baseline_top_k, null_tie_break=args.null_tie_break,
                            null_kind=args.null_kind)
    print(f"wrote AdaMoE model to {dst}")


def _adak(args: argparse.Namespace) -> None:
    from moe_train.config import load_config
    from moe_train.train.adak import train_adak

    if args.miniature:
        from moe_train.miniature import run_miniature
        from moe_train.parallel.launch import apply_launch_env

        apply_launch_env()
        run_miniature(args.config, args.set, "adak")
        return
    cfg = load_config(args.config, args.set)
    import os

    from moe_train.parallel.launch import apply_launch_env
    from moe_train.preflight import check_train_inputs

    apply_launch_env()
    check_train_inputs(cfg, os.environ, overwrite=True, adak=True)
    train_adak(cfg)


def _eval(args: argparse.Namespace) -> None:
    import json
    import os

    if args.lm_eval:
        # lm-eval and `datasets` must never fetch anything: offline unless the caller decided otherwise. Set here,
        # in the entry point, before either is imported; the library (run_lm_eval) leaves the environment alone.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moe_train.eval.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(checkpoint=args.checkpoint, task_files=list(args.task), tokenizer=args.tokenizer,
                     difficulty=args.difficulty, corpus_sequences=args.corpus_sequences,
                     corpus_seq_len=args.corpus_seq_len, corpus_seed=args.corpus_seed, corpus=args.corpus,
                     generate_prompt=args.generate,
                     max_new_tokens=args.max_new_tokens, force_k=args.force_k, compare_topk=args.compare_topk,
                     lm_eval=args.lm_eval, batch_size=args.batch_size, device=args.device, out=args.out)
    # the job's product: one JSON line per result on stdout
    run_eval(cfg, on_result=lambda name, rep: print(json.dumps({"result": name, **rep}), flush=True))


def _generate_data(args: argparse.Namespace) -> None:
    from pathlib import Path

    from moe_train.data import get_corpus, write_generated_corpus

    min_vocab = get_corpus(args.corpus).min_vocab
    if args.vocab_size < min_vocab:
        raise ValueError(f"--vocab-size {args.vocab_size} is too small: the {args.corpus} corpus needs at least "
                         f"{min_vocab} tokens")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a folder (made if missing)")
    out = write_generated_corpus(args.out, args.num_sequences, args.val_sequences, args.seq_len, args.vocab_size,
                                 args.seed, args.corpus)
    print(f"wrote {out / 'train.jsonl'} ({args.num_sequences} sequences) and {out / 'val.jsonl'} "
          f"({args.val_sequences}); train it with data: {{kind: files, corpus: {args.corpus}, "
          f"path: {out / 'train.jsonl'}, "
          f"val_path: {out / 'val.jsonl'}, token_field: tokens, label_field: labels}}")


MINIATURE_HELP = ("run this config at its real world size and mesh with tiny dimensions on CPU (gloo): spawns the "
                  "ranks itself, or runs under torchrun/srun/mpirun; see moe_train/miniature.py")


def _at_least(lo: int):
    """An argparse type: an integer >= lo (argparse prints the error naming the option and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-train", description=__doc__)
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK (which it exports too) is used
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny_adamoe.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=10 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved topology (nodes, ranks, dp/ep layout) and exit without training")
    p.add_argument("--procs-per-node", type=_at_least(1), default=None,
                   help="processes (GPUs) per node for --dry-run when the environment does not say")
    p.add_argument("--nnodes", type=_at_least(1), default=None,
                   help="nodes for --dry-run when the environment does not say")
    p.add_argument("--overwrite", action="store_true",
                   help="train even though train.out_dir holds a finished run (final/), replacing its final model")
    p.add_argument("--miniature", action="store_true", help=MINIATURE_HELP)
    p.set_defaults(func=_train)

    p = sub.add_parser("generate-data", help="write the difficulty-labelled synthetic corpus as jsonl files")
    p.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, labels.json)")
    p.add_argument("--num-sequences", type=_at_least(1), default=4096)
    p.add_argument("--val-sequences", type=_at_least(0), default=64)
    p.add_argument("--seq-len", type=_at_least(1), default=128, help="tokens per sequence are seq_len + 1")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", choices=CORPORA, default="mixed",
                   help="mixed (filler / copy / arith / bracket) or difficulty (recall / computation / trivial / "
                        "unpredictable / copy; moe_train/data/difficulty.py)")
    p.set_defaults(func=_generate_data)

    p = sub.add_parser("convert", help="add AdaMoE null experts to a Hugging Face Mixtral / Qwen2-MoE checkpoint")
    p.add_argument("--src", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--num-null-experts", type=int, required=True, help="m null experts (a multiple of n)")
    p.add_argument("--top-k", type=int, required=True, help="new k over true + null experts (AdaMoE Mixtral: 4)")
    p.add_argument("--baseline-top-k", type=int, default=None, help="FLOPs baseline k (default: the model's k)")
    p.add_argument("--null-tie-break", default="true_first", choices=NULL_TIE_BREAKS,
                   help="true_first (default): function-preserving conversion, refused where it cannot be; topk: the "
                        "AdaMoE authors' exact twins with torch.topk's tie order (moe_train/io/convert.py)")
    p.add_argument("--null-kind", default=None, choices=NULL_KINDS,
                   help="what a null pick returns (default: zero for a top-k model; a model that has null experts "
                        "already, as LongCat-Flash's identity experts, is re-written as is when this, "
                        "--num-null-experts and --top-k are its own, and refused otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst when it already exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("adak", help="Ada-K: warm-start then PPO-train per-layer k allocators on a frozen MoE model")
    p.add_argument("--config", required=True, help="YAML config with an adak section, e.g. configs/tiny_adak.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set adak.penalty=0.01 (repeatable)")
    p.add_argument("--miniature", action="store_true", help=MINIATURE_HELP)
    p.set_defaults(func=_adak)

    p = sub.add_parser("eval", help="evaluate a model: multiple choice / perplexity tasks, experts per token, FLOPs")
    p.add_argument("--checkpoint", required=True, help="model.pt (moe_train checkpoint) or a Hugging Face folder")
    p.add_argument("--task", action="append", default=[], metavar="JSONL",
                   help="task file: {context, choices, gold} lines (multiple choice) or {text} lines (perplexity)")
    p.add_argument("--tokenizer", default="ids",
                   help="ids (space-separated token ids, the tiny models) | byte | a local HF tokenizer folder")
    p.add_argument("--difficulty", action="store_true",
                   help="mean k by difficulty label on held-out sequences of the generated corpus")
    p.add_argument("--corpus-sequences", type=_at_least(1), default=64)
    p.add_argument("--corpus-seq-len", type=_at_least(2), default=128)
    p.add_argument("--corpus-seed", type=int, default=4321, help="differs from training data seeds: held out")
    p.add_argument("--corpus", choices=CORPORA, default="mixed", help="the generated corpus of --difficulty")
    p.add_argument("--generate", default=None, metavar="TEXT", help="prompt for a greedy generation")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=32)
    p.add_argument("--force-k", type=int, default=None, help="run every token with this k (Ada-K models)")
    p.add_argument("--compare-topk", action="store_true",
                   help="Ada-K models: also evaluate with k forced to the base top-k, side by side")
    p.add_argument("--lm-eval", action="store_true",
                   help="also run the --task files through lm-evaluation-harness (offline: sets HF_DATASETS_OFFLINE=1 "
                        "and HF_HUB_OFFLINE=1 unless already set) and report its metrics")
    p.add_argument("--batch-size", type=_at_least(1), default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write every result to this JSON file")
    p.set_defaults(func=_eval)

    from moe_train.planner.cli import add_plan_parser  # `moe-train plan` (moe_train/planner/)

    add_plan_parser(sub, _at_least)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moe_train.train.metrics import configure_logging

    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"moe-train: config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # every user mistake (data, checkpoints, launch layout, refusals) is a ValueError
        print(f"moe-train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if not isinstance(e, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                              FileExistsError)) and e.errno != 28:  # 28: ENOSPC
            raise  # unexpected: keep the traceback
        print(f"moe-train: error: {e.strerror or e}: {e.filename!r}" if e.filename else f"moe-train: error: {e}",
              file=sys.stderr)
        return 2
    except Exception as e:
        from moe_train.parallel.distributed import RendezvousError
        from moe_train.train.trainer import TrainingError

        if isinstance(e, TrainingError):  # the run itself failed (diverged): 1, not a user mistake's 2
            print(f"moe-train: training failed: {_one_line(e)}", file=sys.stderr)
            return 1
        if not isinstance(e, RendezvousError):
            raise
        print(f"moe-train: launch error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
