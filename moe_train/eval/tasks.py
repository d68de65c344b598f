"""Task evaluation: log-likelihood multiple choice and perplexity over local JSONL task files, with experts per token
and FLOPs. Scoring follows lm-evaluation-harness so the two agree (moe_train/eval/scoring.py; the lm-eval adapter
uses the same primitives):
    multiple choice  acc = [argmax ll == gold]; acc_norm divides ll by len(choice) in characters (lm-eval's
                     acc_norm); continuation = delimiter + choice (delimiter " " by default)
    perplexity       ppl = exp(-sum ll / n tokens), every token of the text scored once

Task files (JSONL, one document per line):
    multiple choice  {"context": str, "choices": [str, ...], "gold": int}  (optional "target_delimiter")
    perplexity       {"text": str}
Experts-per-token statistics count every scored position (for multiple choice: every real, non-padding position
of context + continuation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moe_train.eval.codec import encode_pair, prefix_id
from moe_train.eval.scoring import KStats, eval_routing, flops_fields, rolling_loglikelihood, score_continuations
from moe_train.model import MoETransformer


def load_task(path: str | Path) -> tuple[str, list[dict]]:
    """("multiple_choice" | "perplexity", documents) of a JSONL task file (formats in the module docstring);
    ValueError naming the file and line of any mistake, before the model runs."""
    path = Path(path)
    docs = [_parse_line(path, n, line) for n, line in enumerate(_read_lines(path), 1) if line.strip()]
    if not docs:
        raise ValueError(f"task file {str(path)!r} has no documents")
    if all({"context", "choices", "gold"} <= d.keys() for _, d in docs):
        for n, d in docs:
            _check_multiple_choice(path, n, d)
        return "multiple_choice", [d for _, d in docs]
    if all("text" in d for _, d in docs):
        for n, d in docs:
            if not isinstance(d["text"], str) or not d["text"].strip():
                # an empty text scores no token: its perplexity would read exp(0) = 1.0, a perfect model
                raise ValueError(f"{path} line {n}: 'text' must be non-empty text, got {d['text']!r}")
        return "perplexity", [d for _, d in docs]
    raise ValueError(f"task file {str(path)!r}: every line must be either {{\"context\", \"choices\", \"gold\"}} "
                     "(multiple choice) or {\"text\"} (perplexity)")


def _read_lines(path: Path) -> list[str]:
    """The file's lines; a folder, a FIFO or a device is refused by name (reading one would block or never end)."""
    if path.is_dir():
        raise ValueError(f"task file {str(path)!r} is a directory; give a JSONL file")
    if not path.exists():
        raise ValueError(f"task file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"task file {str(path)!r} is not a regular file (a FIFO, socket or device?); give a JSONL "
                         f"file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"task file {str(path)!r} is not UTF-8 text (undecodable byte at offset {e.start})") from None


def _parse_line(path: Path, n: int, line: str) -> tuple[int, dict]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); every line of a task file "
                         f"is one JSON object") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} line {n}: expected one JSON object per line, got a {type(doc).__name__} (a JSON "
                         f"array of documents must be written one object per line)")
    return n, doc


def _check_multiple_choice(path: Path, n: int, d: dict) -> None:
    choices = d["choices"]
    if not isinstance(d["context"], str):
        raise ValueError(f"{path} line {n}: 'context' must be text, got {d['context']!r}")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{path} line {n}: 'choices' must be a non-empty list of non-empty texts, got {choices!r}")
    gold = d["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{path} line {n}: gold={gold!r} must index its {len(choices)} choices")
    if not isinstance(d.get("target_delimiter", " "), str):
        raise ValueError(f"{path} line {n}: 'target_delimiter' must be text, got {d['target_delimiter']!r}")


def check_task_fits(path: str | Path, kind: str, docs: Sequence[dict], codec, max_seq_len: int) -> None:
    """Every document tokenises to something to score, and a multiple-choice context + choice fits the model's
    window (max_seq_len inputs + the last target): a longer one would be cut from the left without a word, scoring
    another question. Perplexity texts may be longer: rolling windows score every token."""
    for n, d in enumerate(docs, 1):
        if kind == "perplexity":
            if not codec.encode(d["text"]):
                raise ValueError(f"{path} document {n}: 'text' {d['text'][:60]!r} has no tokens to score")
            continue
        for j, c in enumerate(d["choices"]):
            ctx, cont = encode_pair(codec, d["context"], d.get("target_delimiter", " ") + c)
            if not cont:
                raise ValueError(f"{path} document {n}: choice {j} {c!r} has no tokens to score")
            if len(ctx) + len(cont) > max_seq_len + 1:
                raise ValueError(f"{path} document {n}: context + choice {j} is {len(ctx) + len(cont)} tokens, "
                                 f"more than the model reads (max_seq_len={max_seq_len} inputs + 1); shorten the "
                                 f"context to at most {max_seq_len + 1 - len(cont)} tokens")


def evaluate_multiple_choice(model: MoETransformer, docs: Sequence[dict], codec, batch_size: int = 16,
                             device: torch.device = torch.device("cpu"), force_k: Optional[int] = None) -> dict:
    requests, spans = [], []
    for d in docs:
        delim = d.get("target_delimiter", " ")
        spans.append((len(requests), len(d["choices"])))
        requests += [encode_pair(codec, d["context"], delim + c) for c in d["choices"]]
    stats = KStats(model.config.num_moe_layers)
    with eval_routing(model, force_k):
        scores = score_continuations(model, requests, batch_size, device, stats)
    acc, acc_norm, preds = [], [], []
    for d, (start, n) in zip(docs, spans):
        lls = np.array([scores[start + j][0] for j in range(n)])
        lens = np.array([float(len(c)) for c in d["choices"]])
        pred = int(np.argmax(lls))
        preds.append(pred)
        acc.append(float(pred == d["gold"]))
        acc_norm.append(float(int(np.argmax(lls / lens)) == d["gold"]))
    rep = {"kind": "multiple_choice", "docs": len(docs), "acc": float(np.mean(acc)),
           "acc_norm": float(np.mean(acc_norm)), "predictions": preds, **stats.summary()}
    mean_len = stats.count / max(len(requests), 1)
    rep.update(flops_fields(model, rep["mean_k_per_layer"], round(mean_len)))
    return rep


def evaluate_perplexity(model: MoETransformer, docs: Sequence[dict], codec, batch_size: int = 16,
                        device: torch.device = torch.device("cpu"), force_k: Optional[int] = None) -> dict:
    stats = KStats(model.config.num_moe_layers)
    ll, n = 0.0, 0
    with eval_routing(model, force_k):
        for d in docs:
            ids = codec.encode(d["text"])
            ll += rolling_loglikelihood(model, ids, prefix_id(codec), batch_size, device, stats)
            n += len(ids)
    rep = {"kind": "perplexity", "docs": len(docs), "tokens": n, "nll_per_token": -ll / max(n, 1),
           "perplexity": math.exp(-ll / max(n, 1)), **stats.summary()}
    rep.update(flops_fields(model, rep["mean_k_per_layer"], round(n / max(len(docs), 1))))
    return rep


def evaluate_docs(model: MoETransformer, kind: str, docs: Sequence[dict], codec, batch_size: int = 16,
                  device: torch.device = torch.device("cpu"), force_k: Optional[int] = None) -> dict:
    fn = evaluate_multiple_choice if kind == "multiple_choice" else evaluate_perplexity
    return fn(model, docs, codec, batch_size, device, force_k)


def evaluate_task(model: MoETransformer, path: str | Path, codec, batch_size: int = 16,
                  device: torch.device = torch.device("cpu"), force_k: Optional[int] = None) -> dict:
    kind, docs = load_task(path)
    check_task_fits(path, kind, docs, codec, model.config.max_seq_len)
    return evaluate_docs(model, kind, docs, codec, batch_size, device, force_k)
