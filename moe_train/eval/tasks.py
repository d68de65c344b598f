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
    """("multiple_choice" | "perplexity", documents) of a JSONL task file (formats in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {str(path)!r} does not exist")
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not docs:
        raise ValueError(f"task file {str(path)!r} has no documents")
    if all({"context", "choices", "gold"} <= d.keys() for d in docs):
        for i, d in enumerate(docs):
            if not isinstance(d["gold"], int) or not 0 <= d["gold"] < len(d["choices"]):
                raise ValueError(f"{path}: document {i}: gold={d['gold']!r} must index its {len(d['choices'])} choices")
        return "multiple_choice", docs
    if all("text" in d for d in docs):
        return "perplexity", docs
    raise ValueError(f"task file {str(path)!r}: every line must be either {{\"context\", \"choices\", \"gold\"}} "
                     "(multiple choice) or {\"text\"} (perplexity)")


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


def evaluate_task(model: MoETransformer, path: str | Path, codec, batch_size: int = 16,
                  device: torch.device = torch.device("cpu"), force_k: Optional[int] = None) -> dict:
    kind, docs = load_task(path)
    fn = evaluate_multiple_choice if kind == "multiple_choice" else evaluate_perplexity
    return fn(model, docs, codec, batch_size, device, force_k)
