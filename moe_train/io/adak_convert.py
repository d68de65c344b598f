"""Ada-K conversion: turn a pretrained top-k MoE into an Ada-K model (arXiv 2410.10456).

Every layer's top-k router becomes an AdaKRouter holding the SAME gate W_g and a new bias-free allocator
W_p [A, D] over k in [k_min, k_max] (A = k_max - k_min + 1). The allocator starts at zero (a uniform policy over
k) and is trained by the warm start and PPO (moe_train.train.adak); everything else is untouched. The allocator is
created in fp32 whatever the model's dtype: it is the master weight the optimizer updates (a bf16 weight would lose
updates below bf16 resolution, e.g. weight decay 0.1 at lr 1e-3), and the router computes it in fp32. The base
model's top_k stays in the config as the FLOPs baseline (``baseline_top_k``).

    add_allocators(model, k_min, k_max)    in place on a loaded model (returns it)

With the allocator forced to k = top_k the converted model computes exactly what the base model computes (the
Ada-K router keeps the base gate convention: renormalised over the picked experts when norm_topk_prob; the score
function, group limits and routed scaling; a fixed selection bias such as DeepSeek-V3's e_score_correction_bias,
use_expert_bias, is copied and selects as before, while a bias still being trained, expert_bias_rate > 0, is refused).

A null router whose null experts return something (LongCat-Flash's identity experts; constant) converts too: the
Ada-K router keeps its null gate, null selection biases, null vectors and tie order, and k counts picks over all n +
z experts (k_max defaults to n + z); the first k of the same ranking are taken, so forced to the base top_k it is
the base model. A compute budget (target_true_experts) is frozen with the rest: its controller bias is added into
null_expert_bias, the controller removed (docs/adak.md: Ada-K over routers with identity experts).
Shape legend: E experts, D hidden, A allocator actions.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from moe_train.config import ConfigError, MoEConfig, validate_moe
from moe_train.io.convert import swap_routers
from moe_train.model.decoder import MoETransformer
from moe_train.routing.adak import AdaKRouter
from moe_train.routing.registry import router_class


def check_adak_conversion(moe: MoEConfig, k_min: int, k_max: Optional[int]) -> MoEConfig:
    """The converted MoEConfig, or ValueError naming the argument and what is allowed (no work done)."""
    base = router_class(moe.router)
    reason = base.adak_base_reason(moe)  # '' for a base Ada-K converts (routing/base.py)
    if reason:
        raise ValueError(f"Ada-K conversion starts from a top-k model, or from one whose null experts return "
                         f"something (identity / constant kinds, as LongCat-Flash's zero-computation experts: its "
                         f"ranking over true + null experts is kept); this model: {reason}")
    if moe.expert_bias_rate > 0:
        raise ValueError(f"this model still trains its aux-loss-free expert bias (expert_bias_rate="
                         f"{moe.expert_bias_rate}); Ada-K freezes the base router, so set model.moe.expert_bias_rate "
                         "to 0 (a fixed bias, use_expert_bias: true, as DeepSeek-V3's correction bias, is carried "
                         "over and selects as before)")
    if moe.capacity_factor is not None:
        raise ValueError(f"capacity_factor={moe.capacity_factor}: Ada-K evaluates the frozen model dropless; "
                         "set model.moe.capacity_factor to null")
    n = moe.pickable_experts  # the picks the frozen router ranks: true (+ null) experts
    k_max_ = n if k_max is None else k_max
    if not 0 <= k_min <= k_max_ <= n or k_max_ < 1:
        raise ValueError(f"Ada-K action range k_min={k_min}, k_max={k_max}: need 0 <= k_min <= k_max <= {n} "
                         f"(the model's {moe.num_experts} experts"
                         + (f" + {moe.num_null_experts} {moe.null_kind!r} null experts" if base.ranks_null_experts else "")
                         + ") and k_max >= 1")
    budget = moe.target_true_experts is not None  # frozen: its bias joins the fixed null selection bias
    new = dataclasses.replace(moe, router=AdaKRouter.name, k_min=k_min, k_max=k_max_,
                              baseline_top_k=moe.resolved_baseline_top_k, target_true_experts=None,
                              use_expert_bias=moe.use_expert_bias or budget)
    try:
        validate_moe(new)
    except ConfigError as e:
        raise ValueError(f"the converted MoE config is invalid: {e}") from None
    return new


def add_allocators(model: MoETransformer, k_min: int = 1, k_max: Optional[int] = None) -> MoETransformer:
    """Replaces every top-k router with an AdaKRouter (same gate weights, zero fp32 allocator: a uniform policy),
    updates ``model.config`` and returns the same model. Build optimizers afterwards: the routers are new modules."""
    new_moe = check_adak_conversion(model.config.moe, k_min, k_max)

    def init(old, new):
        new.allocator.float()  # fp32 master weight on any model dtype (module docstring)
        new.allocator.weight.zero_()
        if old.expert_bias is not None:  # DeepSeek-V3's correction bias: the frozen router selects with it
            new.expert_bias.copy_(old.expert_bias)
        if new.num_null:  # the frozen null router's null experts and their fixed selection offsets
            new.null_gate.weight.copy_(old.null_gate.weight)
            if new.null_values is not None:
                new.null_values.copy_(old.null_values)
            if new.null_expert_bias is not None:
                new.null_expert_bias.copy_(old.null_expert_bias if old.null_expert_bias is not None else 0)
                if old.null_bias is not None:  # the compute budget's shared null bias, now fixed
                    new.null_expert_bias.add_(old.null_bias)

    return swap_routers(model, new_moe, AdaKRouter, init)
