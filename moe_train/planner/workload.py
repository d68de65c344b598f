"""Tokens, true experts and expert rows of one rank's micro-batch, from the config (or a measured true-expert load).

True experts per token, two figures:
  expected  what FLOPs, all-to-all bytes and time use: ``--true-experts`` (e.g. metrics.jsonl's
            true_experts_per_token), else the budget target (model.moe.target_true_experts), else the FLOPs baseline
            top-k (a converted AdaMoE model starts at its base top-k: README "Routers"; an Ada-K warm start begins
            near it), else top_k
  worst     what memory is sized for: every pick true, min(top_k, n) for null experts, k_max for Ada-K and top-p
Rows a rank's experts receive: balanced = the rows it sends (N = T x k); the worst case the config allows is
  dropless  P x T x min(k_worst, E/P): every ep rank sends its every token to this rank's E/P experts (a token can
            send at most one row per expert), bounded only by the router's balance in practice
  capacity  P x E/P x ceil(cf x N / E) (routing/capacity.py: the cap is per expert on each rank's own batch)
Shape legend: T tokens, P ep ranks, E experts, N rows sent, R rows received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from moe_train.config import Config
from moe_train.routing.registry import router_class


@dataclass
class Tokens:
    micro_batch_seqs: int
    tokens: int  # T per micro-batch per rank
    micro_batches: int  # per optimizer step
    k_expected: float
    k_worst: float
    k_baseline: float
    rows_sent: float  # N at k_expected... (memory uses k_worst)
    rows_recv_worst: float
    worst_bound: str
    grad_tokens: int  # Ada-K: tokens of one PPO update forward on this rank (worst case)
    tokens_per_step: int  # tokens this rank processes per optimizer step (all forwards)


def true_experts(cfg: Config, measured: Optional[float], job: str = "train") -> tuple[float, float, float]:
    """(expected, worst, baseline) true experts per token per MoE layer."""
    moe = cfg.model.moe
    n = moe.num_experts
    baseline = float(moe.resolved_baseline_top_k)
    if job == "adak":  # the adak job converts the top-k base: k in [adak.k_min, adak.k_max]
        worst = float(cfg.adak.k_max or n)
    else:
        worst = float(router_class(moe.router).worst_true_experts(moe))
    if measured is not None:
        if not 0 <= measured <= worst:
            raise ValueError(f"--true-experts {measured} is outside [0, {worst:g}], the true experts a token can use "
                             f"with this router ({moe.router}, k={moe.max_slots}, n={n})")
        return float(measured), worst, baseline
    if moe.target_true_experts is not None:
        return float(moe.target_true_experts), worst, baseline
    return min(baseline, worst), worst, baseline


def train_tokens(cfg: Config, world: int, ep: int, measured: Optional[float], imbalance: float = 1.0) -> Tokens:
    t = cfg.train
    if t.batch_size % world or (t.batch_size // world) % t.grad_accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the world size {world} x "
                         f"train.grad_accum_steps={t.grad_accum_steps} (each rank runs micro-batches of whole "
                         f"sequences): change the batch, the accumulation or the GPU count")
    micro = t.batch_size // world // t.grad_accum_steps
    T = micro * t.seq_len
    k_exp, k_worst, k_base = true_experts(cfg, measured)
    worst, bound = recv_bound(cfg, T, k_worst, ep)
    return Tokens(micro_batch_seqs=micro, tokens=T, micro_batches=t.grad_accum_steps, k_expected=k_exp,
                  k_worst=k_worst, k_baseline=k_base, rows_sent=T * k_worst, rows_recv_worst=worst,
                  worst_bound=bound, grad_tokens=T, tokens_per_step=T * t.grad_accum_steps)


def adak_tokens(cfg: Config, world: int, ep: int, measured: Optional[float]) -> Tokens:
    """Ada-K PPO step (moe_train/train/adak.py): rollouts in chunks of ceil(global B / ppo_minibatches) of the
    rank's own sequences; a PPO update forward holds the rank's members of one global minibatch (worst case: all
    of them on this rank, at most its own share)."""
    t, a = cfg.train, cfg.adak
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the world size {world}")
    local = t.batch_size // world
    chunk = min(local, -(-t.batch_size // a.ppo_minibatches))
    T = chunk * t.seq_len
    k_exp, k_worst, k_base = true_experts(cfg, measured, "adak")
    worst, bound = recv_bound(cfg, T, k_worst, ep)
    forwards = 2 + a.ppo_epochs if a.baseline == "greedy" else 1 + a.ppo_epochs
    return Tokens(micro_batch_seqs=chunk, tokens=T, micro_batches=forwards * -(-local // chunk), k_expected=k_exp,
                  k_worst=k_worst, k_baseline=k_base, rows_sent=T * k_worst, rows_recv_worst=worst,
                  worst_bound=bound, grad_tokens=T, tokens_per_step=forwards * local * t.seq_len)


def recv_bound(cfg: Config, T: int, k_worst: float, ep: int) -> tuple[float, str]:
    moe = cfg.model.moe
    E = moe.num_experts
    L = E // ep
    if moe.capacity_factor is not None:
        cap = math.ceil(moe.capacity_factor * T * k_worst / E)
        return float(ep * L * cap), (f"capacity: {ep} ranks x {L} local experts x ceil(cf {moe.capacity_factor:g} x "
                                     f"{T * k_worst:.0f} rows / {E}) = {cap} rows per expert")
    rows = ep * T * min(k_worst, L)
    return float(rows), (f"dropless: bounded only by routing: every one of {ep} ep ranks sending all {T} tokens to "
                         f"this rank's {L} expert(s), {min(k_worst, L):g} row(s) each")
