"""Evaluation: log-likelihood multiple choice, perplexity, experts per token (per layer, per difficulty label), FLOPs.

Scoring follows lm-evaluation-harness so the two agree (moe_train/eval/lm_eval_adapter.py uses the same code):
    multiple choice  ll(choice) = sum of log P(continuation tokens | context), continuation = delimiter + choice
                     (delimiter " " by default); acc = [argmax ll == gold]; acc_norm divides ll by len(choice)
                     in characters (lm-eval's acc_norm)
    perplexity       every token of the text scored after a prefix token (BOS / EOS), in lm-eval's rolling
                     windows of model.max_seq_len inputs; ppl = exp(-sum ll / n tokens)
    long inputs      truncated from the left to the last max_seq_len + 1 tokens (lm-eval's HF model does the same)
Context/continuation split: whole = encode(context + continuation), the context part = encode(context), the
continuation = whole[len(context part):]; trailing spaces of the context move to the continuation.

Tokenisers (``build_codec``): ``ids`` -- text is space-separated token ids, e.g. "0 18 19 20" (the generated corpus
and the tiny models use it: their vocabulary is 64 ids with no text form; BOS = 0); ``byte`` -- the data
pipeline's UTF-8 byte tokenizer; or a local Hugging Face tokenizer folder.

Task files (JSONL, one document per line):
    multiple choice  {"context": str, "choices": [str, ...], "gold": int}  (optional "target_delimiter")
    perplexity       {"text": str}
Ada-K models are evaluated with the greedy allocator (argmax k); ``force_k`` instead runs every token with a fixed k
(the base top-k model, for comparison). Experts-per-token statistics count every scored position (for multiple
choice: every real, non-padding position of context + continuation).
Shape legend: B batch, S sequence, V vocab, T = B*S, L layers.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from moe_train.eval.flops import flops_vs_topk
from moe_train.model import MoETransformer
from moe_train.routing.adak import AdaKRouter

# ----------------------------------------------------------------------------------------------------------
# tokenisation


class TokenIdCodec:
    """Text = space-separated integer token ids ("0 18 19"); BOS (= the prefix token) is 0, as in the corpus."""

    def __init__(self, vocab_size: int, bos_id: int = 0):
        self.vocab_size, self.bos_id = vocab_size, bos_id

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in text.split():
            if not tok.isdigit() or int(tok) >= self.vocab_size:
                raise ValueError(f"token {tok!r} in {text[:60]!r}: the 'ids' tokenizer reads space-separated integer "
                                 f"token ids in [0, {self.vocab_size})")
            ids.append(int(tok))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_codec(spec: str, vocab_size: int):
    """``ids`` | ``byte`` | a local Hugging Face tokenizer folder; checked against the model's vocabulary."""
    if spec == "ids":
        return TokenIdCodec(vocab_size)
    from moe_train.train.data import build_tokenizer

    tok = build_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
                         "; use --tokenizer ids for the tiny synthetic-corpus models")
    return tok


def prefix_id(codec) -> int:
    """The token that starts a text with no context (BOS if the tokenizer has one, else EOS)."""
    bos = getattr(codec, "bos_id", None)
    return bos if bos is not None else codec.eos_id


def encode_pair(codec, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces go to the continuation; an empty context becomes [prefix]."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    if not context:
        return [prefix_id(codec)], codec.encode(continuation)
    whole = codec.encode(context + continuation)
    ctx = codec.encode(context)
    return ctx, whole[len(ctx):]


def load_for_eval(path: str | Path) -> MoETransformer:
    """A moe_train checkpoint file (model.pt) or a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        from moe_train.io.hf import from_hf

        return from_hf(path)
    from moe_train.train.checkpoint import load_model

    return load_model(path)


# ----------------------------------------------------------------------------------------------------------
# routing control and statistics


@contextlib.contextmanager
def eval_routing(model: MoETransformer, force_k: Optional[int] = None):
    """Eval mode; Ada-K routers greedy (argmax k), or every token forced to ``force_k`` experts; restored after."""
    was_training = model.training
    model.eval()
    routers = [layer.moe.router for layer in model.layers if isinstance(layer.moe.router, AdaKRouter)]
    saved = [(r.mode, r.forced_action_T) for r in routers]
    handles = []
    if force_k is not None and not routers:
        if force_k != model.config.moe.top_k:
            raise ValueError(f"force_k={force_k}: only Ada-K models can change k; this is a "
                             f"{model.config.moe.router!r} model with top_k={model.config.moe.top_k}")
    for r in routers:
        if force_k is None:
            r.set_mode("greedy")
            continue
        if not r.k_min <= force_k <= r.k_max:
            raise ValueError(f"force_k={force_k} is outside the allocator's range [{r.k_min}, {r.k_max}]")

        def pre_hook(router, args, k=force_k):
            x_TD = args[0]
            router.set_mode("forced", torch.full((x_TD.shape[0],), k - router.k_min, dtype=torch.long,
                                                 device=x_TD.device))

        handles.append(r.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for r, (mode, forced) in zip(routers, saved):
            r.set_mode(mode, forced)
        model.train(was_training)


class KStats:
    """True experts per token, summed per layer over the counted positions (optionally per group id)."""

    def __init__(self, num_layers: int):
        self.sum_L = torch.zeros(num_layers, dtype=torch.float64)
        self.count = 0
        self.groups: dict[int, list] = {}  # group -> [sum_L, count, loss_sum]

    def add(self, plans, mask_T: torch.Tensor, group_T: Optional[torch.Tensor] = None,
            nll_T: Optional[torch.Tensor] = None) -> None:
        k_LT = torch.stack([p.true_mask_TK.sum(dim=-1) for p in plans]).double().cpu()
        mask_T = mask_T.cpu()
        self.sum_L += (k_LT * mask_T).sum(dim=1)
        self.count += int(mask_T.sum())
        if group_T is None:
            return
        group_T = group_T.cpu()
        for g in group_T[mask_T].unique().tolist():
            sel = mask_T & (group_T == g)
            entry = self.groups.setdefault(int(g), [torch.zeros_like(self.sum_L), 0, 0.0])
            entry[0] += k_LT[:, sel].sum(dim=1)
            entry[1] += int(sel.sum())
            if nll_T is not None:
                entry[2] += float(nll_T.cpu()[sel].double().sum())

    @staticmethod
    def _summary(sum_L: torch.Tensor, count: int) -> dict:
        per_layer = (sum_L / max(count, 1)).tolist()
        return {"mean_k": sum(per_layer) / len(per_layer), "mean_k_per_layer": per_layer}

    def summary(self) -> dict:
        return self._summary(self.sum_L, self.count)


def flops_fields(model: MoETransformer, per_layer: Sequence[float], seq_len: int) -> dict:
    k_base = model.config.moe.resolved_baseline_top_k
    return {"flops_vs_topk": flops_vs_topk(model.config, list(per_layer), max(1, seq_len)),
            "expert_flops_vs_topk": sum(per_layer) / len(per_layer) / k_base, "baseline_top_k": k_base}


# ----------------------------------------------------------------------------------------------------------
# corpus: loss, experts per token by difficulty label


@torch.no_grad()
def corpus_report(model: MoETransformer, batches: Iterable, device: torch.device = torch.device("cpu"),
                  force_k: Optional[int] = None, label_names: Optional[dict] = None) -> dict:
    """Validation loss, mean k overall / per layer / per difficulty label, FLOPs vs top-k.

    ``batches`` yields (inputs_BS, targets_BS, labels_BS or None); labels are the difficulty of each target token
    (moe_train.train.synthetic.LABELS), i.e. of the prediction made at that position."""
    from moe_train.train.synthetic import EASY_LABELS, HARD_LABELS, LABELS

    names = LABELS if label_names is None else label_names
    stats = KStats(model.config.num_layers)
    nll_sum, n, seq_len = 0.0, 0, 0
    with eval_routing(model, force_k):
        for inputs, targets, labels in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            logits, plans = model(inputs, return_plans=True)
            nll_T = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                      targets.reshape(-1), reduction="none")
            mask_T = torch.ones(targets.numel(), dtype=torch.bool)
            stats.add(plans, mask_T, None if labels is None else labels.reshape(-1), nll_T)
            nll_sum += float(nll_T.double().sum())
            n += targets.numel()
            seq_len = inputs.shape[1]
    rep = {"val_loss": nll_sum / max(n, 1), "tokens": n, **stats.summary()}
    rep.update(flops_fields(model, rep["mean_k_per_layer"], seq_len))
    if stats.groups:
        by = {}
        for g, (sum_L, count, loss) in sorted(stats.groups.items()):
            by[names.get(g, str(g))] = {"tokens": count, "loss": loss / count, **KStats._summary(sum_L, count)}
        rep["by_label"] = by
        for tag, group in (("hard", HARD_LABELS), ("easy", EASY_LABELS)):
            present = [stats.groups[g] for g in group if g in stats.groups]
            if present:
                rep[f"mean_k_{tag}"] = KStats._summary(sum(e[0] for e in present),
                                                       sum(e[1] for e in present))["mean_k"]
    return rep


# ----------------------------------------------------------------------------------------------------------
# log-likelihood primitives (shared with the lm-eval adapter)


@torch.no_grad()
def score_continuations(model: MoETransformer, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                        device: torch.device = torch.device("cpu"),
                        stats: Optional[KStats] = None) -> list[tuple[float, bool]]:
    """(sum log P(continuation | context), every continuation token is the argmax) per (context, continuation)."""
    max_len = model.config.max_seq_len
    out: list[tuple[float, bool]] = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        rows = []
        for ctx, cont in chunk:
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood to score")
            if len(cont) > max_len:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds model.max_seq_len={max_len}")
            rows.append((ctx + cont)[-(max_len + 1):])
        S = max(len(r) for r in rows) - 1
        inputs = torch.zeros(len(rows), S, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.bool)
        for b, r in enumerate(rows):
            inputs[b, :len(r) - 1] = torch.tensor(r[:-1])
            mask[b, :len(r) - 1] = True
        logits, plans = model(inputs.to(device), return_plans=True)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        if stats is not None:
            stats.add(plans, mask.reshape(-1))
        for b, (r, (_, cont)) in enumerate(zip(rows, chunk)):
            n = len(r) - 1
            pos = torch.arange(n - len(cont), n)
            tgt = torch.tensor(cont)
            ll = float(logp[b, pos, tgt].double().sum())
            greedy = bool((logp[b, pos].argmax(dim=-1) == tgt).all())
            out.append((ll, greedy))
    return out


def rolling_windows(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows scoring every token of ``ids`` exactly once (lm-eval's rolling windows with
    one token of context, made disjoint): the first window starts at ``prefix``; later windows predict max_len
    tokens after one token of context, and the last one takes as much context as fits in max_len inputs."""
    ids = list(ids)
    if not ids:
        return []
    first = min(max_len, len(ids))
    out = [([prefix], ids[:first])]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_len)
        end = done + n
        ctx_start = max(end - max_len - 1, 0)
        out.append((ids[ctx_start:done], ids[done:end]))
        done = end
    return out


def rolling_loglikelihood(model: MoETransformer, ids: Sequence[int], prefix: int, batch_size: int = 16,
                          device: torch.device = torch.device("cpu"), stats: Optional[KStats] = None) -> float:
    """Sum of log P(token | previous tokens) over every token of ``ids`` (perplexity's numerator)."""
    if not ids:
        return 0.0
    windows = rolling_windows(ids, prefix, model.config.max_seq_len)
    return sum(ll for ll, _ in score_continuations(model, windows, batch_size, device, stats))


# ----------------------------------------------------------------------------------------------------------
# tasks


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
    stats = KStats(model.config.num_layers)
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
    stats = KStats(model.config.num_layers)
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


# ----------------------------------------------------------------------------------------------------------
# `moe-train eval`


def run_lm_eval(model: MoETransformer, task_files: Sequence[str], tokenizer: str, batch_size: int,
                device: str, force_k: Optional[int] = None) -> dict:
    """The task files through lm-evaluation-harness, offline (task YAMLs written to a temporary folder)."""
    import os
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moe_train.eval.lm_eval_adapter import MoETrainLM, write_task_yaml

    lm = MoETrainLM(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device, force_k=force_k)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, f in enumerate(task_files):
            name = f"moe_train_{i}_{Path(f).stem}".replace("-", "_").replace(".", "_")
            write_task_yaml(name, f, tmp)
            names.append(name)
        manager = TaskManager(include_path=tmp, include_defaults=False)  # indexing the built-in tasks takes minutes
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                      log_samples=False)
    out = {f: {k: v for k, v in res["results"][n].items() if isinstance(v, (int, float))}
           for f, n in zip(task_files, names)}
    return {"tasks": out, **lm.report()}


def run_eval(args) -> dict:
    """The `moe-train eval` job: one JSON line per result on stdout, all of them in --out."""
    from moe_train.eval.generate import greedy_generate
    from moe_train.train.synthetic import generate

    device = torch.device(args.device)
    model = load_for_eval(args.checkpoint).to(device)
    codec = build_codec(args.tokenizer, model.config.vocab_size)
    variants = [("adak" if model.config.moe.router == "adak" and args.force_k is None else "model", args.force_k)]
    if args.compare_topk:
        if model.config.moe.router != "adak":
            raise ValueError("--compare-topk needs an Ada-K model (router adak); this one is "
                             f"{model.config.moe.router!r}")
        variants.append((f"top{model.config.moe.top_k}", model.config.moe.top_k))
    results: dict = {"checkpoint": str(args.checkpoint), "router": model.config.moe.router}

    def emit(name: str, rep: dict) -> None:
        results[name] = rep
        print(json.dumps({"result": name, **{k: v for k, v in rep.items() if k != "predictions"}}), flush=True)

    for tag, k in variants:
        for f in args.task:
            emit(f"{tag}:{f}", evaluate_task(model, f, codec, args.batch_size, device, k))
        if args.difficulty:
            if args.corpus_seq_len > model.config.max_seq_len:
                raise ValueError(f"--corpus-seq-len={args.corpus_seq_len} exceeds model.max_seq_len="
                                 f"{model.config.max_seq_len}")
            tokens, labels = generate(args.corpus_sequences, args.corpus_seq_len, model.config.vocab_size,
                                      args.corpus_seed)
            batches = ((tokens[i:i + args.batch_size, :-1], tokens[i:i + args.batch_size, 1:],
                        labels[i:i + args.batch_size, 1:]) for i in range(0, tokens.shape[0], args.batch_size))
            emit(f"{tag}:difficulty", corpus_report(model, batches, device, force_k=k))
        if args.lm_eval and args.task:
            emit(f"{tag}:lm_eval", run_lm_eval(model, args.task, args.tokenizer, args.batch_size, args.device, k))
        if args.generate is not None:
            prompt = codec.encode(args.generate) or [prefix_id(codec)]
            new, k_steps = greedy_generate(model, prompt, args.max_new_tokens, device=device, force_k=k)
            emit(f"{tag}:generate", {"prompt": args.generate, "completion": codec.decode(new), "k_per_token": k_steps})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results
