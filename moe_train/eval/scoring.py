"""How a model is run and scored for evaluation: routing control, experts-per-token statistics, FLOPs fields, and
lm-evaluation-harness's log-likelihood primitives (shared by the task evaluator and the lm-eval adapter).

    multiple choice  ll(choice) = sum of log P(continuation tokens | context)          score_continuations
    perplexity       every token scored after a prefix token (BOS / EOS), in lm-eval's rolling windows of
                     model.max_seq_len inputs                                           rolling_loglikelihood
    long inputs      truncated from the left to the last max_seq_len + 1 tokens (lm-eval's HF model does the same)
Ada-K models are evaluated with the greedy allocator (argmax k); ``force_k`` instead runs every token with a fixed k
(the base top-k model, for comparison). For a null-expert (AdaMoE) model, a ``force_k`` other than its k routes over
the true experts only, top-``force_k`` of the true gate (its baseline_top_k: the top-k model it was converted from).
Shape legend: B batch, S sequence, T = B*S tokens, K slots per token, L layers.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from moe_train.model import MoETransformer
from moe_train.model.flops import flops_vs_topk
from moe_train.routing.null_experts import NullExpertRouter

# ----------------------------------------------------------------------------------------------------------
# routing control and statistics


@contextlib.contextmanager
def eval_routing(model: MoETransformer, force_k: Optional[int] = None):
    """Eval mode; Ada-K routers greedy (argmax k), or every token forced to ``force_k`` experts; restored after."""
    was_training = model.training
    model.eval()
    routers = [r for r in model.routers() if r.learns_k]  # Ada-K: set_mode / forced actions
    saved = [(r.mode, r.forced_action_T) for r in routers]
    handles = []
    nulls = [r for r in model.routers() if isinstance(r, NullExpertRouter)]  # _true_experts_only sets its fields
    if force_k is not None and nulls and force_k != model.config.moe.top_k:
        with _true_experts_only(nulls, force_k):
            with eval_routing(model):
                yield
        return
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


@contextlib.contextmanager
def _true_experts_only(routers: list[NullExpertRouter], k: int):
    """AdaMoE routers routed as their top-k baseline: the true experts' gate alone, top-``k`` of its scores, no
    null expert and no null selection bias (for a converted model, the routing of the top-k model it came from)."""
    n = routers[0].num_experts
    if not 1 <= k <= n:
        raise ValueError(f"force_k={k}: a null-expert model routed over its {n} true experts only takes k in [1, {n}]")
    names = ("top_k", "num_null", "null_gate", "null_bias", "null_expert_bias")
    saved = [{a: getattr(r, a) for a in names} for r in routers]
    try:
        for r in routers:
            r.top_k, r.num_null, r.null_gate, r.null_bias, r.null_expert_bias = k, 0, None, None, None
        yield
    finally:
        for r, attrs in zip(routers, saved):
            for a, v in attrs.items():
                setattr(r, a, v)


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
    """Cost against the baseline top-k model: whole-model FLOPs ratio and expert-only ratio (mean k / base k)."""
    k_base = model.config.moe.resolved_baseline_top_k
    return {"flops_vs_topk": flops_vs_topk(model.config, list(per_layer), max(1, seq_len)),
            "expert_flops_vs_topk": sum(per_layer) / len(per_layer) / k_base, "baseline_top_k": k_base}


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
