"""Top-k routing in one pass: backend dispatch + the plain-torch reference (the routers' own math).

    p = softmax(z) in fp32 (score_func "sigmoid": sigmoid(z)),  picks = top-k of (p + bias) over N = E true + Z null
    experts (exactly equal scores: the lower index first),  null picks (index >= E) -> -1 with weight 0,
    w = p at the true picks, renormalised over them when norm_topk_prob (a token with none divides by 1),
    counts_N = picks per expert (true and null buckets)

select_topk and renormalize below are the one selection of every router (top-k, null experts, Ada-K, top-p; they
live here, below moe_train.routing, so that the reference and the routers share them without an import cycle).
The one-pass path serves TopKRouter (Z = 0) and NullExpertRouter (routing/topk.py, routing/null_experts.py) when
their math is exactly this (each router class says when: kernel_excluded, routing/base.py). Backends
(``backend=``; config ``model.moe.routing_backend``, the one list ROUTING_BACKENDS below):
  auto    the Triton kernel (moe_train.kernels.triton_routing) on CUDA tensors when triton is installed, the torch
          reference otherwise. The kernel implements tie_break "true_first" only: "topk" (torch.topk's order)
          always takes the torch path, on every backend but "triton", which refuses it.
  torch   the reference below, on any device.
  triton  the kernel; CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton_routing is first
          imported (tests).
The two backends select the same experts except where two scores differ only in the last bits of their fp32
softmax (the kernel's exp / sum are not torch's); weights agree to fp32 rounding. NaN scores rank above every
number in both (torch.sort's order; the lower index first among NaNs): a token with NaN logits picks real experts
with NaN weights (softmax: the whole row is NaN, so experts 0..k-1), never the padding or nothing.
Shape legend: T tokens, K picks per token, E true experts, N = E + Z scored experts (true, then null: the
routing/ exception of docs/shapes.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

_TRITON_MODULE = "moe_train.kernels.triton_routing"
# The one lists of these settings (config.py types model.moe.routing_backend / score_func / null_tie_break with them):
# the one-pass routing backends (module docstring); the score functions (routing/scores.py: softmax over the scored
# experts | sigmoid per expert, DeepSeek-V3); the orders of exactly tied scores select_topk applies (see there).
ROUTING_BACKENDS = ("auto", "torch", "triton")
BACKENDS = ROUTING_BACKENDS
SCORE_FUNCS = ("softmax", "sigmoid")
TIE_BREAKS = ("true_first", "topk")


@dataclass
class Routed:
    """probs_TN: fp32 scores of all N experts; weight_TK: fp32 gate of each pick (0 on null picks);
    expert_idx_TK: int64 true expert of each pick, -1 on null picks; counts_N: int64 picks per expert (E + Z)."""

    probs_TN: torch.Tensor
    weight_TK: torch.Tensor
    expert_idx_TK: torch.Tensor
    counts_N: torch.Tensor


def select_topk(probs_TN: torch.Tensor, k: int, bias_N: Optional[torch.Tensor] = None,
                tie_break: str = "true_first"):
    """Returns (weight_TK, idx_TK): the k best experts by (probs + bias), best first, and their UNBIASED
    probabilities. ``bias_N`` may be [T, N] (routing/scores.py selection_bias: -inf rules out group-limited experts). The one selection of every router (top-k, null experts, Ada-K; Megatron's VariableKRouter runs
    these routers).

    tie_break (TIE_BREAKS; the null router's null_tie_break) orders EXACTLY equal scores: ``true_first`` (default) ranks the lower index
    first through a stable descending sort, deterministic on every device and dtype; with the null router's layout
    (true experts before null experts) a true expert ranks before its null twins. bf16 logits tie between distinct
    experts often enough (a few tokens per thousand) that a converted model could only reproduce its top-k source
    if both break ties the same way. ``topk`` leaves the order to torch.topk (device- and dtype-dependent), the
    authors' AdaMoE behaviour, kept as an option for the null router only.
    """
    scores = probs_TN if bias_N is None else probs_TN + bias_N
    if tie_break == "true_first":
        idx_TK = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        assert tie_break == "topk", tie_break  # one of TIE_BREAKS (config.py types null_tie_break with it)
        _, idx_TK = torch.topk(scores, k, dim=-1)
    return probs_TN.gather(-1, idx_TK), idx_TK


def renormalize(weight_TK: torch.Tensor, keep_TK: torch.Tensor) -> torch.Tensor:
    """w_i / sum_{kept j} w_j over the kept slots, 0 elsewhere; a token with nothing kept divides by 1."""
    w = weight_TK * keep_TK
    denom = w.sum(dim=-1, keepdim=True)
    return w / torch.where(denom > 0, denom, torch.ones_like(denom))


def route_topk_torch(logits_TN: torch.Tensor, top_k: int, num_true: int, bias_N: Optional[torch.Tensor] = None,
                     norm_topk_prob: bool = True, score_func: str = "softmax",
                     tie_break: str = "true_first") -> Routed:
    """The reference: the routers' pure functions (select_topk, renormalize above)."""
    z = logits_TN.float()
    probs_TN = torch.sigmoid(z) if score_func == "sigmoid" else torch.softmax(z, dim=-1)
    weight_TK, idx_TK = select_topk(probs_TN, top_k, bias_N, tie_break)
    true_TK = idx_TK < num_true
    weight_TK = renormalize(weight_TK, true_TK) if norm_topk_prob else weight_TK * true_TK
    counts_N = torch.bincount(idx_TK.reshape(-1), minlength=logits_TN.shape[-1])
    expert_idx_TK = torch.where(true_TK, idx_TK, torch.full_like(idx_TK, -1))
    return Routed(probs_TN, weight_TK, expert_idx_TK, counts_N)


def _triton_kernels():
    try:
        return importlib.import_module(_TRITON_MODULE)
    except ImportError as e:
        raise ImportError(f"routing backend 'triton' needs the triton package ({e}); install triton or use "
                          "routing_backend: torch (or auto: triton only on CUDA when it is installed)") from e


def use_triton(backend: str, logits_TN: torch.Tensor, tie_break: str = "true_first") -> bool:
    """Whether this call runs the kernel (see the module docstring); raises for impossible explicit requests."""
    if backend not in BACKENDS:
        raise ValueError(f"routing backend {backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return logits_TN.is_cuda and tie_break == "true_first" and importlib.util.find_spec("triton") is not None
    if tie_break != "true_first":
        raise ValueError(f"routing backend 'triton' implements null_tie_break 'true_first' only, got {tie_break!r}; "
                         "use routing_backend: auto or torch (torch.topk's tie order)")
    if not logits_TN.is_cuda and not _triton_kernels().INTERPRETED:
        raise ValueError(f"routing backend 'triton' got a {logits_TN.device.type} tensor: the kernel needs CUDA "
                         "tensors (or TRITON_INTERPRET=1 set before moe_train.kernels.triton_routing is imported); "
                         "use routing_backend: torch or auto on CPU")
    return True


def route_topk(logits_TN: torch.Tensor, top_k: int, num_true: int, bias_N: Optional[torch.Tensor] = None,
               norm_topk_prob: bool = True, score_func: str = "softmax", tie_break: str = "true_first",
               backend: str = "auto") -> Routed:
    """One routing pass over logits_TN [T, N] (N = num_true true experts, then the null experts)."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func {score_func!r} is not one of {SCORE_FUNCS}")
    if not use_triton(backend, logits_TN, tie_break):
        return route_topk_torch(logits_TN, top_k, num_true, bias_N, norm_topk_prob, score_func, tie_break)
    bias = None if bias_N is None else bias_N.detach().float()
    probs, w, idx, counts = _triton_kernels().route_differentiable(logits_TN, bias, top_k, num_true, norm_topk_prob,
                                                                   score_func)
    return Routed(probs, w, idx, counts)


def route_fused(logits_TN: torch.Tensor, cfg, top_k: int, num_true: int, bias_N: Optional[torch.Tensor] = None,
                norm_topk_prob: bool = True, tie_break: str = "true_first") -> Optional[Routed]:
    """The routers' entry (BaseRouter.route_fused, for a router whose math is the kernel's: its kernel_excluded is
    ''): the one-pass kernel when ``cfg.routing_backend`` selects it for this tensor; None otherwise, and the router
    runs its own torch path (the same math). probs_TN holds the raw scores (softmax or sigmoid); the router derives
    its balancing distribution from them as on the torch path."""
    if cfg.routing_backend == "torch":
        return None
    if bias_N is not None and bias_N.dim() != 1:
        return None  # a per-token bias (group-limited selection) is not the kernel's math
    if not use_triton(cfg.routing_backend, logits_TN, tie_break):
        return None
    return route_topk(logits_TN, top_k, num_true, bias_N, norm_topk_prob, cfg.score_func, backend="triton")
