"""The `moe-train` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys

from moe_train.config import CORPORA, NULL_KINDS, NULL_TIE_BREAKS, ConfigError


def _train(args: argparse.Namespace) -> None:
    import os

    from moe_train.config import load_config
    from moe_train.parallel.launch import apply_launch_env, topology_from_env

    if args.miniature and not args.dry_run and not args.check:
        from moe_train.miniature import run_miniature

        apply_launch_env()
        summary = run_miniature(args.config, args.set, "train", check=_check_miniature)
        if summary:
            print(summary)
        return
    cfg = load_config(args.config, args.set)
    if args.check:
        _check_only(cfg, args)
        return
    if args.dry_run:
        nnodes, procs = args.nnodes, args.procs_per_node
        if nnodes is None and not _launched(os.environ) and cfg.parallel.world_size:
            # no launch to read and no node count given: the world size the config is written for
            procs = procs or cfg.parallel.world_size
            if cfg.parallel.world_size % procs:
                raise ValueError(f"parallel.world_size={cfg.parallel.world_size} is not a multiple of "
                                 f"--procs-per-node {procs}")
            nnodes = cfg.parallel.world_size // procs
        topo = topology_from_env(os.environ, cfg.parallel.ep, cfg.model.moe.num_experts, procs, nnodes)
        print(topo.describe())
        return
    apply_launch_env()  # mpirun / srun variables -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    from moe_train.preflight import check_train_inputs

    check_train_inputs(cfg, os.environ, overwrite=args.overwrite)  # every input, before process groups and model
    from moe_train.train.trainer import train

    train(cfg)


def _launched(env) -> bool:
    """Whether the environment describes a launch (Slurm allocation, torchrun / MPI ranks)."""
    from moe_train.parallel.launch import resolve_launch_env

    return "SLURM_JOB_NODELIST" in env or "WORLD_SIZE" in env or bool(resolve_launch_env(env))


def _check_miniature(mini) -> None:
    """What a miniature train run needs at its end, checked before its ranks start (its inputs are generated):
    the Hugging Face export of its model (train.export_hf), on a meta-device skeleton."""
    import torch

    from moe_train.model import MoETransformer
    from moe_train.preflight import check_export_hf

    with torch.device("meta"):
        check_export_hf(mini, MoETransformer(mini.model))


def _check_only(cfg, args: argparse.Namespace, adak: bool = False) -> None:
    """``--check``: load_config (done) and every preflight check that needs no process group, for the world size
    of the launch to come (--nnodes x --procs-per-node, else parallel.world_size, else one replica of ep ranks).
    What launch/*.sh run before they spawn ranks: a mistake fails once, with one line, exit 2."""
    from moe_train.preflight import check_train_inputs

    p = cfg.parallel
    if args.nnodes is not None or args.procs_per_node is not None:
        world = (args.nnodes or 1) * (args.procs_per_node or 1)
    else:
        world = p.world_size or p.ep
    # the launch as torchrun will make it: rank 0 of `world`, the port left to the launcher (it checks it itself)
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "1"}
    model = check_train_inputs(cfg, env, overwrite=args.overwrite or adak, adak=adak)
    print(f"moe-train: {args.config} checked for world {world} (dp {world // p.ep} x ep {p.ep}): "
          f"{model.family}, {model.num_layers} layers, router {model.moe.router}, out_dir {cfg.train.out_dir}")


def _config(args: argparse.Namespace) -> None:
    if args.explain is not None:
        from moe_train.explain import explain

        print(explain(args.explain or None))
        return
    if not args.config:
        raise ValueError("moe-train config: give --explain [KEY] (every key, or one), or --config FILE to print "
                         "the resolved config")
    import yaml

    from moe_train.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.set)), sort_keys=False), end="")


def _plot(args: argparse.Namespace) -> None:
    from moe_train.plot import plot_runs

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    for path in plot_runs(args.runs, args.out, only=only, dpi=args.dpi):
        print(f"wrote {path}")


def _convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from moe_train.io.atomic import check_writable
    from moe_train.io.convert import convert_to_adamoe

    if Path(args.dst).exists() and not args.overwrite and Path(args.dst).resolve() != Path(args.src).resolve():
        raise ValueError(f"--dst {args.dst!r} already exists; convert refuses to replace it: choose a new folder or "
                         f"pass --overwrite")
    check_writable(args.dst, "--dst")  # a read-only or foreign folder fails now, not after reading the model
    dst = convert_to_adamoe(args.src, args.dst, num_null_experts=args.num_null_experts, top_k=args.top_k,
                            baseline_top_k=args.baseline_top_k, null_tie_break=args.null_tie_break,
                            null_kind=args.null_kind)
    print(f"wrote AdaMoE model to {dst}")


def _export(args: argparse.Namespace) -> None:
    """`moe-train export`: a model.pt, a DCP checkpoint (RUN/checkpoints/step_N) or a run folder -> a Hugging Face
    folder. A model.pt streams one decoder layer at a time (io/hf.py to_hf_stream); a DCP checkpoint is loaded whole,
    in this one process (the run's config.yaml rebuilds its model; fine for models that fit host memory)."""
    import logging
    from pathlib import Path

    from moe_train.io.hf import to_hf_stream

    src, dst = Path(args.checkpoint), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"--dst {args.dst!r} already exists; export refuses to replace it: choose a new folder or "
                         f"pass --overwrite")
    if src.is_dir() and (src / "final" / "model.pt").is_file():  # a finished run: its final model
        src = src / "final" / "model.pt"
    elif src.is_dir() and (src / "checkpoints").is_dir():  # an unfinished run: its newest checkpoint
        from moe_train.io.dcp_checkpoint import latest_checkpoint

        latest = latest_checkpoint(src)
        if latest is None:
            raise ValueError(f"run folder {str(src)!r} has no final/model.pt and no complete checkpoint")
        src = latest
    if src.is_file():
        from moe_train.io.model_file import ModelFileReader

        reader = ModelFileReader(src)
        cfg, specs, get, run = reader.config, reader.specs, reader.get, src.parent.parent
    elif src.is_dir() and (src / ".metadata").is_file():
        cfg, specs, get, run = _load_dcp_model(src)
    else:
        raise ValueError(f"--checkpoint {args.checkpoint!r} is neither a model.pt, a DCP checkpoint folder "
                         f"(RUN/checkpoints/step_N) nor a run folder")
    carry = [Path(p) for p in args.carry_from]
    if (run / "config.yaml").is_file():  # the run's source folder holds its tokenizer (copied unless --carry-from)
        from moe_train.config import load_config

        init_from = load_config(run / "config.yaml").train.init_from
        if init_from and Path(init_from).is_dir():
            carry.insert(0, Path(init_from))
    logging.getLogger("moe_train.io.hf").setLevel(logging.INFO)  # which loaders run the export (to_hf_stream logs it)
    out = to_hf_stream(cfg, specs, get, dst, max_shard_size=args.max_shard_size, carry_from=carry)
    print(f"wrote {out}")


def _load_dcp_model(ckpt):
    """(model config, specs, get, run folder) of a DCP checkpoint RUN/checkpoints/step_N, loaded in this process with
    the model its run trained (RUN/config.yaml; LoRA adapters merged, as the run's final model.pt would be)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from moe_train.config import load_config
    from moe_train.io.dcp_checkpoint import verify_checkpoint
    from moe_train.model.lora import merge_lora_stream
    from moe_train.train.build import build_job_model
    from moe_train.train.engine_registry import engine_class

    run = ckpt.parent.parent
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{str(ckpt)!r}: a DCP checkpoint is rebuilt from its run's config, expected "
                         f"{str(run / 'config.yaml')!r} (checkpoints live in RUN/checkpoints/step_N)")
    cfg = load_config(run / "config.yaml")
    if not engine_class(cfg.parallel.engine).dcp_checkpoints:
        raise ValueError(f"{str(ckpt)!r} is a parallel.engine: {cfg.parallel.engine} run's checkpoint, not a DCP one; "
                         "export its final/model.pt instead")
    verify_checkpoint(ckpt)
    torch.manual_seed(cfg.train.seed)
    model = build_job_model(cfg)  # one process on the CPU: every expert here (DCP reshards any saved layout)
    state = model.state_dict()  # aliases the parameters: dcp.load fills them in place
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(ckpt))
    specs = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
    tensors = iter(state.items())
    if cfg.train.lora_rank:
        specs, tensors = merge_lora_stream(specs, tensors, cfg.train.lora_alpha)
    merged = dict(tensors)
    return model.config, specs, merged.__getitem__, run


def _adak(args: argparse.Namespace) -> None:
    from moe_train.config import load_config
    from moe_train.train.adak import train_adak

    if args.miniature and not args.check:
        from moe_train.miniature import run_miniature
        from moe_train.parallel.launch import apply_launch_env

        apply_launch_env()
        summary = run_miniature(args.config, args.set, "adak")
        if summary:
            print(summary)
        return
    cfg = load_config(args.config, args.set)
    if args.check:
        _check_only(cfg, args, adak=True)
        return
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
                     baseline=args.baseline, lm_eval=args.lm_eval, batch_size=args.batch_size, device=args.device,
                     out=args.out)
    if args.json:  # one JSON line per result on stdout, as each is ready
        run_eval(cfg, on_result=lambda name, rep: print(json.dumps({"result": name, **rep}), flush=True))
        return
    from moe_train.eval.table import format_results

    results = run_eval(cfg, on_result=lambda name, rep: print(f"done: {name}", file=sys.stderr, flush=True))
    print(format_results({k: ({n: v for n, v in r.items() if n != "predictions"} if isinstance(r, dict) else r)
                          for k, r in results.items()}))


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


CHECK_HELP = ("check the config and every input (init_from, data, out_dir, the layout at the launch's world size: "
              "--nnodes x --procs-per-node, else parallel.world_size) without a process group, then exit: 0 when "
              "the job can start, 2 with one line naming the mistake (launch/*.sh run it before spawning ranks)")
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
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
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

    p = sub.add_parser("export", help="write a trained model as a Hugging Face folder (transformers loads it; "
                                      "routers transformers lacks ship their own modeling code)")
    p.add_argument("--checkpoint", required=True,
                   help="a model.pt, a DCP checkpoint folder (RUN/checkpoints/step_N, rebuilt from RUN/config.yaml) "
                        "or a run folder (its final/model.pt, else its newest checkpoint)")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--carry-from", action="append", default=[], metavar="DIR",
                   help="copy this folder's non-weight files (tokenizer, generation config) into the export; "
                        "the run's train.init_from folder is carried by default (repeatable; later ones win)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 5GB, 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst when it already exists")
    p.set_defaults(func=_export)

    p = sub.add_parser("adak", help="Ada-K: warm-start then PPO-train per-layer k allocators on a frozen MoE model")
    p.add_argument("--config", required=True, help="YAML config with an adak section, e.g. configs/tiny_adak.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set adak.penalty=0.01 (repeatable)")
    p.add_argument("--miniature", action="store_true", help=MINIATURE_HELP)
    p.add_argument("--check", action="store_true", help=CHECK_HELP)
    p.add_argument("--nnodes", type=_at_least(1), default=None, help="nodes of the launch --check checks for")
    p.add_argument("--procs-per-node", type=_at_least(1), default=None,
                   help="processes per node of the launch --check checks for")
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
                   help="also evaluate with the base top-k routing, side by side: Ada-K models with k forced to the "
                        "base k; null-expert (AdaMoE) models over their true experts only with baseline_top_k")
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="a second model (model.pt or HF folder, e.g. the top-k model an AdaMoE / Ada-K model came "
                        "from) evaluated the same way, in the rows tagged baseline")
    p.add_argument("--json", action="store_true", help="one JSON line per result instead of the table")
    p.add_argument("--lm-eval", action="store_true",
                   help="also run the --task files through lm-evaluation-harness (offline: sets HF_DATASETS_OFFLINE=1 "
                        "and HF_HUB_OFFLINE=1 unless already set) and report its metrics")
    p.add_argument("--batch-size", type=_at_least(1), default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write every result to this JSON file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("config", help="explain the config keys (--explain [KEY]) or print a resolved config")
    p.add_argument("--explain", nargs="?", const="", default=None, metavar="KEY",
                   help="every key with its type, default, allowed values and meaning; with KEY (e.g. "
                        "model.moe.top_k, or a section such as train) just that")
    p.add_argument("--config", default=None, help="YAML config to print resolved (defaults filled in)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_config)

    p = sub.add_parser("plot", help="PNGs comparing runs from their metrics.jsonl (needs matplotlib)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train.out_dir) holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: plots/ in the first run)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated figures: loss, experts_per_layer, flops_vs_topk, tokens_per_s, memory, "
                        "overview (default: all)")
    p.add_argument("--dpi", type=_at_least(20), default=80)
    p.set_defaults(func=_plot)

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
        _user_error(f"moe-train: config error: {_one_line(e)}")
        return 2
    except ValueError as e:  # every user mistake (data, checkpoints, launch layout, refusals) is a ValueError
        _user_error(f"moe-train: error: {_one_line(e)}")
        return 2
    except OSError as e:
        if not isinstance(e, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                              FileExistsError)) and e.errno != 28:  # 28: ENOSPC
            raise  # unexpected: keep the traceback
        _user_error(f"moe-train: error: {e.strerror or e}: {e.filename!r}" if e.filename else
                    f"moe-train: error: {e}")
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


def _user_error(line: str) -> None:
    """Prints a user mistake once per launch: before the process group exists every rank of a torchrun / mpirun /
    srun launch runs the same checks and fails the same way, so rank 0 alone prints and the others exit 2 silently.
    Once the group exists a rank may fail alone: every rank prints, naming itself. A rank outside WORLD_SIZE
    prints too: no rank 0 may exist to say it (RANK=5 with WORLD_SIZE=2)."""
    import os

    import torch.distributed as dist

    from moe_train.parallel.launch import launch_rank

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            line = f"[rank {dist.get_rank()}] {line}"
    elif 0 < launch_rank(os.environ) < _launch_world(os.environ):
        return
    print(line, file=sys.stderr)


def _launch_world(env) -> int:
    """WORLD_SIZE as launched (1 when absent or not a number: the checks report that themselves)."""
    world = env.get("WORLD_SIZE", "")
    return int(world) if world.isdigit() else 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
