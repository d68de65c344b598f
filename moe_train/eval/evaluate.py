"""The `moe-train eval` job: task files (multiple choice / perplexity), experts per token by difficulty label,
lm-evaluation-harness, greedy generation; for an Ada-K model optionally side by side with its base top-k.

``EvalConfig`` is the job's typed configuration (the CLI builds it from its arguments). Each result goes to
``on_result(name, report)`` as it is ready (the CLI prints one JSON line per result on stdout; the default logs it)
and all of them to ``EvalConfig.out``. The pieces: codec.py (tokenisation, lm-eval's context split), scoring.py
(routing control, log-likelihood primitives), tasks.py (task files), report.py (the validation report),
generate.py, lm_eval_adapter.py; the model is loaded by moe_train.io.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from moe_train.data import get_corpus
from moe_train.eval.codec import build_codec, prefix_id
from moe_train.eval.generate import greedy_generate
from moe_train.eval.report import corpus_report
from moe_train.eval.tasks import check_task_fits, evaluate_docs, load_task
from moe_train.io import load_any
from moe_train.model import MoETransformer
from moe_train.routing.registry import router_class

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What `moe-train eval` evaluates and how (the CLI's arguments, one field each)."""

    checkpoint: str  # model.pt (moe_train checkpoint) or a Hugging Face folder
    task_files: list[str] = field(default_factory=list)  # JSONL task files (moe_train/eval/tasks.py)
    tokenizer: str = "ids"  # ids | byte | a local Hugging Face tokenizer folder
    difficulty: bool = False  # mean k by difficulty label on held-out sequences of the generated corpus
    corpus_sequences: int = 64
    corpus_seq_len: int = 128
    corpus_seed: int = 4321  # differs from training data seeds: held out
    corpus: str = "mixed"  # the generated corpus of --difficulty (config.CORPORA)
    generate_prompt: Optional[str] = None  # a prompt for one greedy generation
    max_new_tokens: int = 32
    force_k: Optional[int] = None  # run every token with this k (Ada-K models)
    compare_topk: bool = False  # Ada-K / AdaMoE models: also evaluate with their base top-k routing
    baseline: Optional[str] = None  # a second model (e.g. the top-k base) evaluated the same way, tagged "baseline"
    lm_eval: bool = False  # also run the task files through lm-evaluation-harness
    batch_size: int = 16
    device: str = "cpu"
    out: Optional[str] = None  # every result as one JSON file


def _log_result(name: str, rep: dict) -> None:
    logger.info(json.dumps({"result": name, **rep}))


def _variants(model: MoETransformer, cfg: EvalConfig) -> list[tuple[str, Optional[int]]]:
    """(tag, force_k) of each way the model runs: as it is (Ada-K: greedy k), and its base top-k if asked:
    Ada-K with k forced to the base model's k; a null-expert (AdaMoE) model over its true experts only with its
    baseline_top_k (moe_train/eval/scoring.py)."""
    moe = model.config.moe
    router = router_class(moe.router)
    variants = [(moe.router if router.learns_k and cfg.force_k is None else "model", cfg.force_k)]
    if cfg.compare_topk:
        k = router.baseline_k(moe)  # Ada-K: its base model's k; null experts: baseline_top_k (routing/base.py)
        if k is not None:
            variants.append((f"top{k}", k))
        else:
            raise ValueError(f"--compare-topk compares an Ada-K or null-expert (AdaMoE) model with its base top-k "
                             f"routing; this is a {moe.router!r} model: give the model to compare with as "
                             f"--baseline PATH")
    return variants


def _difficulty_batches(model: MoETransformer, cfg: EvalConfig) -> Iterator[tuple]:
    """(inputs_BS, targets_BS, labels_BS) over held-out sequences of the generated corpus."""
    tokens, labels = get_corpus(cfg.corpus).generate(cfg.corpus_sequences, cfg.corpus_seq_len,
                                                     model.config.vocab_size, cfg.corpus_seed)
    B = cfg.batch_size
    return ((tokens[i:i + B, :-1], tokens[i:i + B, 1:], labels[i:i + B, 1:]) for i in range(0, tokens.shape[0], B))


# (field, its command-line option, the smallest value that evaluates something)
_AT_LEAST = (("batch_size", "--batch-size", 1), ("corpus_sequences", "--corpus-sequences", 1),
             ("corpus_seq_len", "--corpus-seq-len", 2), ("max_new_tokens", "--max-new-tokens", 1))


def check_eval_config(cfg: EvalConfig) -> tuple[torch.device, dict[str, tuple[str, list[dict]]]]:
    """Every argument that can be checked without the model, before it is loaded: counts (0 sequences would report a
    loss of 0.0), the device, the task files (kind, documents) and that --out can be written (a mistake there would
    otherwise surface after the whole evaluation). Returns the device and the loaded tasks."""
    for name, option, lo in _AT_LEAST:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{option} must be an integer >= {lo}, got {value!r}")
    device = _check_device(cfg.device)
    tasks = {f: load_task(f) for f in cfg.task_files}
    _check_out(cfg.out)
    return device, tasks


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here (this torch build or machine has "
                             f"none); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: eval runs on cpu or cuda")
    return device


def _check_out(out: Optional[str]) -> None:
    """--out names a file that can be written: not a folder, under a folder that exists or can be made."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a directory; give the path of a JSON file")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {out!r} cannot be written: {str(probe)!r} is a file, not a folder")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(probe, os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"--out {out!r} cannot be written: {str(path if path.exists() else probe)!r} is not "
                         f"writable by this user")


def _check_fits(model: MoETransformer, cfg: EvalConfig, codec, tasks: dict) -> None:
    """What needs the model's window: the tasks' documents and the --difficulty sequences."""
    max_len = model.config.max_seq_len
    for f, (kind, docs) in tasks.items():
        check_task_fits(f, kind, docs, codec, max_len)
    if cfg.difficulty and cfg.corpus_seq_len > max_len:
        raise ValueError(f"--corpus-seq-len={cfg.corpus_seq_len} exceeds model.max_seq_len={max_len}")


def run_eval(cfg: EvalConfig, on_result: Callable[[str, dict], None] = _log_result) -> dict:
    """The `moe-train eval` job: every result, keyed "<variant>:<what>", plus the checkpoint and its router."""
    device, tasks = check_eval_config(cfg)
    model = load_any(cfg.checkpoint).to(device)
    codec = build_codec(cfg.tokenizer, model.config.vocab_size)
    variants = [(tag, model, k) for tag, k in _variants(model, cfg)]
    _check_fits(model, cfg, codec, tasks)  # before any scoring
    results: dict = {"checkpoint": str(cfg.checkpoint), "router": model.config.moe.router}
    if cfg.baseline is not None:
        base = load_any(cfg.baseline).to(device)
        if base.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--baseline {cfg.baseline!r} has vocab_size {base.config.vocab_size}, the checkpoint "
                             f"{model.config.vocab_size}: the two must read the same tokens")
        _check_fits(base, cfg, codec, tasks)
        variants.append(("baseline", base, None))
        results["baseline"] = {"checkpoint": str(cfg.baseline), "router": base.config.moe.router}

    def emit(name: str, rep: dict) -> None:
        results[name] = rep
        on_result(name, {k: v for k, v in rep.items() if k != "predictions"})

    for tag, model, k in variants:
        for f, (kind, docs) in tasks.items():
            emit(f"{tag}:{f}", evaluate_docs(model, kind, docs, codec, cfg.batch_size, device, k))
        if cfg.difficulty:
            corpus = get_corpus(cfg.corpus)
            emit(f"{tag}:difficulty", corpus_report(model, _difficulty_batches(model, cfg), device, force_k=k,
                                                    label_names=corpus.labels, label_groups=corpus.groups))
        if cfg.lm_eval and cfg.task_files:
            from moe_train.eval.lm_eval_adapter import run_lm_eval  # optional dependency: lm-evaluation-harness

            emit(f"{tag}:lm_eval", run_lm_eval(model, cfg.task_files, cfg.tokenizer, cfg.batch_size, cfg.device, k))
        if cfg.generate_prompt is not None:
            prompt = codec.encode(cfg.generate_prompt) or [prefix_id(codec)]
            new, k_steps = greedy_generate(model, prompt, cfg.max_new_tokens, device=device, force_k=k)
            emit(f"{tag}:generate", {"prompt": cfg.generate_prompt, "completion": codec.decode(new),
                                     "k_per_token": k_steps})
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(results, indent=1))
    return results
