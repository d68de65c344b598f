"""The router base class: what every router shares, and the facts each router class declares about itself.

A router is one file: a ``BaseRouter`` subclass decorated with ``@register``, listed once in routing/registry.py.
Everything the rest of the package needs to know about a kind of router is asked of its class (``router_class(name)``
in routing/registry.py), never branched on its name:

    config facts (classmethods of a MoEConfig ``e``, no module built)
        pickable_experts(e)     experts a token's picks range over (true, + null where the router ranks them)
        resolved_k_max(e)       the cap on picks of a per-token-k router (k_max's default)
        max_slots(e)            slots per token in the routing plan
        worst_true_experts(e)   the most true experts a token can use (planner/workload.py)
        validate_config(e, p)   the router's own config checks (ConfigError naming ``p``.key); config.validate_moe
                                calls it, so a router's rules live beside the router
        kernel_excluded(e)      why the one-pass Triton routing kernel (kernels/routing.py) cannot compute this
                                router's math ('' when it can)
        capacity_drops_to_null(e)  a capacity-dropped slot becomes a null pick (renormalised over the true picks)
        hf_remote_reason(e)     why transformers' own family model cannot run it (io/hf_remote; None: it can)
        hf_top_k(e)             the k transformers' family router routes an export with
        gate_flops_per_token(e, D)  the router's forward FLOPs per token (model/flops.py)
        describe(e)             its experts and k in words (the trainer's start line)
        baseline_k(e)           the k of the top-k routing it is compared with (evaluate --compare-topk), or None
        adak_base_reason(e)     why Ada-K cannot convert a model of this router ('' when it can: io/adak_convert.py)
        converts_from           routers of a train.init_from model converted to this one on load
        ranks_null_experts, variable_k, learns_k: what its plan holds (see the class attributes)
    instance state and hooks (no-op defaults here, so callers never probe with getattr)
        gate, moe_cfg, num_experts, null_values (None but for constant null experts)
        update_bias(counts_E)   after an optimizer step: the aux-loss-free expert bias (if the router trains one)
        update_budget(mean)     after an optimizer step: the compute budget's null bias (if it has one)
        gate_weights()          the gate matrices whose activations the planner sizes
        activation_bytes(D, c)  the planner's saved bytes per token (planner/activations.py)

The registry (``ROUTERS`` name -> class, ``ALIASES`` old name -> name) is filled by ``register`` here, at the bottom
of routing/, so that each router module can register itself without importing routing/registry.py.
Shape legend: T tokens, D hidden, E true experts, Z null experts, N = E + Z, K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn

from moe_train.errors import config_fail
from moe_train.kernels.routing import Routed, route_fused, select_topk
from moe_train.routing.balancing import update_expert_bias
from moe_train.routing.scores import router_scores, selection_bias

if TYPE_CHECKING:
    from moe_train.config import MoEConfig

# name -> router class, in registration order (routing/registry.py's import order); old name -> name
ROUTERS: dict[str, type["BaseRouter"]] = {}
ALIASES: dict[str, str] = {}


def register(cls: type["BaseRouter"]) -> type["BaseRouter"]:
    """Class decorator: makes ``cls`` buildable as ``model.moe.router: cls.name`` (and each of ``cls.aliases``)."""
    assert cls.name and cls.name not in ROUTERS and cls.name not in ALIASES, cls.name
    for alias in cls.aliases:
        assert alias not in ROUTERS and alias not in ALIASES, alias
        ALIASES[alias] = cls.name
    ROUTERS[cls.name] = cls
    return cls


@dataclass
class RouterActivationBytes:
    """What the planner counts for one router (planner/activations.py): bytes saved for backward per token and per
    layer, what the routing plan keeps per token, the scored experts Z and the plan's slots K."""

    per_token: float
    fixed: float
    plan_per_token: float
    Z: int
    K: int


class BaseRouter(nn.Module):
    """The gate (a bias-free linear map D -> E over the true experts), the config it routes by, and the defaults
    of every fact and hook (module docstring). Subclasses set ``name`` and implement ``forward`` with the shared
    pieces of routing/scores.py, routing/balancing.py and ``route_fused``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    ranks_null_experts: ClassVar[bool] = False  # its ranking may hold model.moe.num_null_experts null experts
    variable_k: ClassVar[bool] = False  # keeps a per-token subset of k_max ranked picks: the plan has k_max slots
    learns_k: ClassVar[bool] = False  # an allocator picks each token's k (Ada-K: set_mode, the PPO trainer)
    trains_expert_bias: ClassVar[bool] = False  # expert_bias_rate > 0 trains its selection bias (aux-loss-free)
    converts_from: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.moe_cfg = cfg  # score_func, topk_method / groups, routed_scaling_factor (routing/scores.py), backend
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)
        # what the MoE layer's combine reads for constant null experts; a router with them sets a Parameter
        self.null_values: Optional[nn.Parameter] = None

    def register_expert_bias(self, cfg: MoEConfig) -> None:
        """The selection-only expert bias [E] (DeepSeek-V3's e_score_correction_bias; the aux-loss-free balancing
        state of a router that trains it, expert_bias_rate > 0) as a buffer, so it is checkpointed and moves with the
        model; None without either."""
        self.expert_bias_rate = cfg.expert_bias_rate if self.trains_expert_bias else 0.0  # update_bias's step
        has_bias = cfg.use_expert_bias or (self.trains_expert_bias and cfg.expert_bias_rate > 0)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts) if has_bias else None)

    # ------------------------------------------------------------------------------------------------------
    # config facts

    @classmethod
    def pickable_experts(cls, e: MoEConfig) -> int:
        return e.num_experts + (e.num_null_experts if cls.ranks_null_experts else 0)

    @classmethod
    def resolved_k_max(cls, e: MoEConfig) -> int:
        return e.num_experts if e.k_max is None else e.k_max

    @classmethod
    def max_slots(cls, e: MoEConfig) -> int:
        return cls.resolved_k_max(e) if cls.variable_k else e.top_k

    @classmethod
    def worst_true_experts(cls, e: MoEConfig) -> int:
        """The most true experts a token can use (the planner's worst case)."""
        return min(cls.max_slots(e), e.num_experts)

    @classmethod
    def validate_config(cls, e: MoEConfig, p: str) -> None:
        """The router's own checks; the defaults refuse the settings only some routers read."""
        if e.num_null_experts > 0 and not cls.ranks_null_experts:
            config_fail(f"{p}.num_null_experts", e.num_null_experts,
                        f"null experts need router: null_experts (router is {e.router!r}); set num_null_experts: 0 "
                        f"or router: null_experts")
        if e.null_kind != "zero" and (not cls.ranks_null_experts or e.num_null_experts < 1):
            config_fail(f"{p}.null_kind", e.null_kind,
                        f"a {e.null_kind!r} kind describes null experts: needs router: null_experts and "
                        f"num_null_experts >= 1 (router is {e.router!r}, num_null_experts={e.num_null_experts}); "
                        f"or null_kind: zero")

    @classmethod
    def validate_top_k(cls, e: MoEConfig, p: str) -> None:
        """top_k: the picks (the FLOPs baseline of a per-token-k router) within the pickable experts."""
        pickable = cls.pickable_experts(e)
        if not 1 <= e.top_k <= pickable:
            config_fail(f"{p}.top_k", e.top_k, f"must be in [1, {pickable}] (k cannot exceed the {pickable} "
                        f"{cls.experts_word()})")

    @classmethod
    def experts_word(cls) -> str:
        return "experts"

    @classmethod
    def validate_unread(cls, e: MoEConfig, p: str) -> None:
        """Settings read by one router only, refused elsewhere (they would silently do nothing)."""
        if e.top_p_renormalize:
            config_fail(f"{p}.top_p_renormalize", e.top_p_renormalize, f"only router: top_p reads it (router is "
                        f"{e.router!r}); other routers renormalise with norm_topk_prob")
        if e.target_true_experts is not None:
            config_fail(f"{p}.target_true_experts", e.target_true_experts, f"a compute budget steers null experts: "
                        f"needs router: null_experts (router is {e.router!r})")

    @classmethod
    def kernel_excluded(cls, e: MoEConfig) -> str:
        """Why the one-pass routing kernel cannot compute this router's math ('' when it can): the kernel is
        softmax/sigmoid scores, a per-expert selection bias, top-k with the lower index first on exact ties, null
        picks masked to -1 with weight 0 (null_kind zero), renormalisation over the true picks. Every other case
        runs the router's torch path (routing_backend auto) or is refused (routing_backend triton)."""
        return f"router {cls.name!r} (its own selection)"

    @classmethod
    def capacity_drops_to_null(cls, e: MoEConfig) -> bool:
        return False

    @classmethod
    def hf_remote_reason(cls, e: MoEConfig) -> Optional[str]:
        return None

    @classmethod
    def hf_top_k(cls, e: MoEConfig) -> int:
        return e.top_k

    @classmethod
    def megatron_reason(cls, e: MoEConfig) -> Optional[str]:
        """Why the Megatron adapter (parallel/megatron/router.py VariableKRouter) cannot run this router with
        ``e``; None: it can."""
        return None

    @classmethod
    def gate_flops_per_token(cls, e: MoEConfig, D: int, extras: bool = True) -> float:
        """The gate's 2*D*E (``extras``: plus null gates, allocators: what only this router computes)."""
        return 2 * D * e.num_experts

    @classmethod
    def describe(cls, e: MoEConfig) -> str:
        return f"{e.num_experts} experts, k {e.top_k}"

    @classmethod
    def baseline_k(cls, e: MoEConfig) -> Optional[int]:
        return None

    @classmethod
    def adak_base_reason(cls, e: MoEConfig) -> str:
        return f"its router is {e.router!r}"

    # ------------------------------------------------------------------------------------------------------
    # hooks the trainer and the MoE layer call on every router

    def update_bias(self, counts_E: torch.Tensor) -> None:
        """After an optimizer step with the step's per-expert SELECTIONS (``plan.selected_counts_E``, before capacity
        drops, summed over micro-batches/ranks: post-drop counts hide exactly the overload to correct): the
        aux-loss-free expert bias of a router that trains one; nothing otherwise (Ada-K's frozen base, top-p)."""
        if self.trains_expert_bias and self.expert_bias is not None:
            update_expert_bias(self.expert_bias, counts_E, self.expert_bias_rate)

    def update_budget(self, true_experts_per_token: float) -> None:
        """After an optimizer step, with the measured true experts per token: nothing unless the router holds a
        compute budget."""

    def gate_weights(self) -> list[torch.Tensor]:
        return [self.gate.weight]

    def select(self, logits_TN: torch.Tensor, k: int, bias_N: Optional[torch.Tensor] = None,
               tie_break: str = "true_first") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared torch path of scoring and selection (routing/scores.py): (scores_TN, weight_TK, idx_TK), the
        fp32 scores of the config's score function, the k best by scores + selection bias (``bias_N`` plus the
        group limit of topk_method), their unbiased scores."""
        c = self.moe_cfg
        scores_TN = router_scores(logits_TN, c.score_func)
        bias = selection_bias(scores_TN, self.num_experts, bias_N, c.topk_method, c.n_group, c.topk_group)
        weight_TK, idx_TK = select_topk(scores_TN, k, bias, tie_break)
        return scores_TN, weight_TK, idx_TK

    def route_fused(self, logits_TN: torch.Tensor, top_k: int, bias_N: Optional[torch.Tensor],
                    tie_break: str = "true_first") -> Optional[Routed]:
        """The one-pass kernel's routing when this router's math is the kernel's and the backend selects it; None:
        the router runs its own torch path (kernels/routing.py)."""
        if self.kernel_excluded(self.moe_cfg):  # validate_moe refuses routing_backend 'triton' then
            return None
        return route_fused(logits_TN, self.moe_cfg, top_k, self.num_experts, bias_N, self.norm_topk_prob, tie_break)

    # ------------------------------------------------------------------------------------------------------
    # the planner's saved bytes (planner/activations.py; every count in bytes, per token unless said)

    def plan_shape(self) -> tuple[int, int]:
        """(Z scored experts, K plan slots) the planner counts."""
        return self.num_experts, self.moe_cfg.top_k

    def _saved_ids(self, K: int, Z: int) -> int:
        """int64 expert ids per token the plan keeps."""
        return K

    def _selection_bytes(self, Z: int, K: int) -> float:
        """Scores, their sort and the gathered gates: softmax out 4Z, sort values 4Z + indices 8Z, the gather's
        sum 4, the renormalisation 9, the weights 5K."""
        return 4 * Z + 4 * Z + 8 * Z + 4 + 9 + 5 * K

    def _own_bytes(self, D: int, c: float) -> float:
        """What only this router saves per token (an allocator's input and log-probs)."""
        return 0.0

    def _fixed_bytes(self, D: int, c: float) -> float:
        """Saved once per layer (e.g. a concatenated gate matrix)."""
        return 0.0

    def _null_gate_bytes(self, K: int) -> float:
        return 0.0

    def activation_bytes(self, D: int, c: float) -> RouterActivationBytes:
        """The saved bytes of this router without its input (the MoE block counts that once); ``c``: bytes per
        element of the compute dtype (autocast: 2)."""
        Z, K = self.plan_shape()
        per_token = self._selection_bytes(Z, K)
        sigmoid = self.moe_cfg.score_func == "sigmoid"
        if sigmoid:  # the plan's probs are the scores normalised to sum 1: one more [T, Z], and the clamped sum
            per_token += 4 * Z + 8
        per_token += self._own_bytes(D, c)
        plan = 4 * Z * (2 if sigmoid else 1) + 4 * Z + 8 * self._saved_ids(K, Z) + 4 * K + self._null_gate_bytes(K)
        return RouterActivationBytes(per_token=per_token, fixed=self._fixed_bytes(D, c), plan_per_token=plan, Z=Z,
                                     K=K)
