"""Our routers inside Megatron-Core: ``MoESubmodules(router=VariableKRouter.builder(adamoe(16, top_k=4)))``.

One Megatron module wraps moe_train's three routers (moe_train.routing: TopKRouter, NullExpertRouter, AdaKRouter)
and returns Megatron's router contract for the TRUE experts only:

    probs [T, E] float32    the gate weight of each picked true expert, 0 elsewhere
    routing_map [T, E] bool  the picked true experts; a null pick is simply absent, a token whose picks are all
                             null (or Ada-K k = 0) has an all-False row: it is never dispatched and outputs 0

The routing math is moe_train's own: the router module is built once on the meta device and called with
torch.func.functional_call on this module's parameters, so Megatron owns the weights (its init, dtype casts,
sequence-parallel gradient reduction, checkpoints) and moe_train owns the selection. Parameter names:

    weight            [E, D]  the true gate, Megatron's own name: a Megatron top-k checkpoint loads unchanged
    null_weight       [m, D]  AdaMoE null gate (method "null_experts"); missing from a top-k checkpoint it is initialised
                              as weight repeated m/E times, the AdaMoE conversion (convert.py does it offline)
    allocator_weight  [A, D]  Ada-K allocator (method "adak"), A = k_max - k_min + 1 actions

Balancing terms are attached the way Megatron attaches its own: MoEAuxLossAutoScaler on ``probs`` (so Megatron's
loss scale reaches them) and its per-layer tracker (compat.record_moe_metric: "load_balancing_loss", "z_loss",
plus "true_experts_per_token"). The load-balancing loss counts the ACTUAL selections (null picks in one shared
bucket, AdaMoE), not T * topk:

    c_i   selections of expert i (true counts, then the m null counts averaged: c~_null = null picks / m),
          summed over the tp x cp group like Megatron's counts
    L     = N * sum_i (c~_i / sum_j c~_j) * (sum_{local t} p_{t,i}) / (valid tokens in the tp x cp group)

which equals Megatron's switch_load_balancing_loss_func exactly when k is fixed and there are no null experts.
Both terms are moe_train's own functions (routing/balancing.py: load_balancing_loss with the tp x cp counts and
token count, router_z_loss with the padding mask), the ones the native routers and the global aux-loss hook call.
Shape legend (docs/shapes.md, with its exceptions for N and L):
S sequence, B micro-batch, T = S*B tokens, D hidden, E true experts, m null experts, N = E + m,
K slots per token, A Ada-K actions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from torch.func import functional_call

from moe_train.config import ROUTERS, SCORE_FUNCS, MoEConfig, validate_moe
from moe_train.parallel.collectives import all_reduce
from moe_train.parallel.megatron import compat
from moe_train.routing import RoutingPlan, canonical_router_name, router_class
from moe_train.routing.balancing import load_balancing_loss, null_bucket_counts, router_z_loss
from moe_train.routing.base import ALIASES
from moe_train.routing.null_experts import null_gate_from_true
from moe_train.routing.plan import counts_from_idx

logger = logging.getLogger(__name__)

METHODS = ROUTERS  # moe_train's routers (config.ROUTERS, the router registry's names; old names are ALIASES)
DISPATCHERS = ("variable_k", "megatron")
LOSS_TYPES = ("aux_loss", "none")


@dataclass(frozen=True)
class VariableKRouting:
    """What Megatron's TransformerConfig cannot say: which moe_train router and its variable-k settings.

    method: ``topk`` (moe_train's top-k: the reference), ``null_experts`` (AdaMoE null experts; old name ``null``),
    ``adak`` (Ada-K).
    top_k: picks per token over the n true (+ m null) experts; None = config.moe_router_topk.
    Everything else (E, softmax, aux / z-loss coefficients, router dtype, norm of the top-k weights through
    ``moe_router_pre_softmax``) comes from the TransformerConfig.
    """

    method: str = "null_experts"
    num_null_experts: int = 0
    top_k: Optional[int] = None
    k_min: int = 1
    k_max: Optional[int] = None
    # method "null_experts": order of exactly tied scores (moe_train.config.NULL_TIE_BREAKS, routing/null_experts.py): "true_first" ranks a true
    # expert before its null twins (a null gate loaded as the true gate repeated starts function-preserving when
    # ceil(top_k / (m/E + 1)) is the source's top-k, see moe_train/io/convert.py); "topk" is the authors' behaviour.
    null_tie_break: str = "true_first"
    # "variable_k": our all-to-all (VariableKMoELayer, sized by true assignments); "megatron": keep the dispatcher
    # the TransformerConfig names, allowed where Megatron's is exact for variable k (allgather; alltoall without
    # moe_permute_fusion, whose fused kernel sizes its buffer as T * topk; flex, whose DeepEP indices the layer
    # with_variable_k installs (ZeroComputeMoELayer) builds with -1 for null slots, parallel/megatron/flex.py).
    dispatcher: str = "variable_k"
    permute_backend: str = "auto"  # moe_train.kernels.permute backend of the variable_k dispatcher
    # method "null_experts": what a null pick returns, moe_train.config.NULL_KINDS (zero = AdaMoE; identity / constant are
    # added on the token's rank by parallel/megatron/zero_compute.py, never dispatched; docs/zero_compute.md)
    null_kind: str = "zero"

    def __post_init__(self):
        if self.method in ALIASES:  # an old router name ("null"): the router it names
            object.__setattr__(self, "method", canonical_router_name(self.method))

    def moe_config(self, config) -> MoEConfig:
        """moe_train's MoEConfig for this routing under a Megatron TransformerConfig, validated."""
        if self.method not in METHODS:
            raise ValueError(f"VariableKRouting.method={self.method!r} is not allowed: one of {METHODS}")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"VariableKRouting.dispatcher={self.dispatcher!r} is not allowed: one of {DISPATCHERS}")
        if self.dispatcher == "megatron":
            kind = config.moe_token_dispatcher_type
            if kind == "alltoall" and config.moe_permute_fusion:
                raise ValueError("dispatcher='megatron' with moe_token_dispatcher_type='alltoall' and "
                                 "moe_permute_fusion=True assumes T * topk rows; use dispatcher='variable_k' (ours), "
                                 "Megatron's allgather, unfused alltoall or flex")
        if config.num_moe_experts is None:
            raise ValueError("TransformerConfig.num_moe_experts is None: a variable-k router needs an MoE config")
        moe = MoEConfig(router=self.method, num_experts=config.num_moe_experts,
                        top_k=config.moe_router_topk if self.top_k is None else self.top_k,
                        num_null_experts=self.num_null_experts, null_tie_break=self.null_tie_break,
                        null_kind=self.null_kind,
                        k_min=self.k_min, k_max=self.k_max, **_score_conventions(config))
        validate_moe(moe, p="VariableKRouting")  # ConfigError is a ValueError naming the field
        reason = router_class(self.method).megatron_reason(moe)
        if reason is not None:
            raise ValueError(f"VariableKRouting(method={self.method!r}): {reason}")
        return moe


def adamoe(num_null_experts: int, top_k: Optional[int] = None, **kwargs) -> VariableKRouting:
    """AdaMoE: ``num_null_experts`` zero-cost experts, ``top_k`` picks over true + null (Mixtral: 16, 4)."""
    return VariableKRouting(method="null_experts", num_null_experts=num_null_experts, top_k=top_k, **kwargs)


def adak(k_min: int = 1, k_max: Optional[int] = None, **kwargs) -> VariableKRouting:
    """Ada-K: an allocator picks k in [k_min, k_max] per token over the (frozen) top-k router."""
    return VariableKRouting(method="adak", k_min=k_min, k_max=k_max, **kwargs)


def topk(top_k: Optional[int] = None, **kwargs) -> VariableKRouting:
    """moe_train's plain top-k (the reference: equals Megatron's TopKRouter at the same weights)."""
    return VariableKRouting(method="topk", top_k=top_k, **kwargs)


def _score_conventions(config) -> dict:
    """moe_train's MoEConfig router conventions (routing/scores.py) for Megatron's score settings.

    softmax: pre_softmax=False is a softmax over the top-k logits = the picks renormalised (Mixtral); True keeps the
    raw probabilities (Qwen1.5-MoE norm_topk_prob=False). sigmoid (DeepSeek-V3): Megatron always renormalises the
    picks when moe_router_topk > 1. Group-limited routing (moe_router_num_groups / moe_router_group_topk): Megatron
    scores a group by the sum of its best moe_router_topk // moe_router_group_topk choice scores: 1 is DeepSeek-V2's
    group_limited_greedy, 2 DeepSeek-V3's noaux_tc. moe_router_enable_expert_bias: the selection-only expert bias
    (Megatron's finalize_model_grads updates it from local_tokens_per_expert)."""
    score = getattr(config, "moe_router_score_function", "softmax")
    if score not in SCORE_FUNCS:
        raise ValueError(f"TransformerConfig.moe_router_score_function={score!r} is not supported by the variable-k "
                         f"router; allowed: {SCORE_FUNCS}")
    out = dict(score_func=score, norm_topk_prob=(config.moe_router_topk > 1 if score == "sigmoid"
                                                 else not config.moe_router_pre_softmax),
               use_expert_bias=bool(getattr(config, "moe_router_enable_expert_bias", False)))
    groups, group_topk = getattr(config, "moe_router_num_groups", None), getattr(config, "moe_router_group_topk", None)
    if groups:
        per = config.moe_router_topk // group_topk if group_topk else 0
        if per not in (1, 2):
            raise ValueError(f"TransformerConfig.moe_router_topk // moe_router_group_topk = {per}: Megatron scores a "
                             "group by its best that many experts; the variable-k router implements 1 (DeepSeek-V2 "
                             "group_limited_greedy) and 2 (DeepSeek-V3 noaux_tc)")
        if score == "softmax" and not config.moe_router_pre_softmax:
            raise ValueError("group-limited routing with softmax scores needs moe_router_pre_softmax=True: without it "
                             "Megatron scores groups by raw logits, which the variable-k router does not implement")
        out.update(topk_method="group_limited_greedy" if per == 1 else "noaux_tc", n_group=groups,
                   topk_group=group_topk)
    return out


def _loss_coefficients(config) -> dict[str, float]:
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    if isinstance(types, str):
        types, coeffs = [types], [coeffs]
    elif not isinstance(coeffs, (list, tuple)):
        coeffs = [coeffs] * len(types)
    out = {}
    for t, c in zip(types, coeffs):
        if t not in LOSS_TYPES:
            raise ValueError(f"moe_router_load_balancing_type={t!r} is not supported by the variable-k router: one "
                             f"of {LOSS_TYPES} (seq_aux_loss / global_aux_loss / sinkhorn assume a fixed top-k)")
        if t == "aux_loss":
            out[t] = float(c)
    return out


def _check_config(config) -> None:
    """Megatron router features that assume fixed-k top-k routing and have no variable-k meaning here."""
    def off(v):
        return not v
    checks = {  # name: (predicate on the value, what is allowed and why)
        "moe_expert_capacity_factor": (lambda v: v is None, "None (dropless): token dropping assumes a fixed "
                                                            "top-k; capacity with null experts is moe_train's own"),
        "moe_pad_expert_input_to_capacity": (off, "False: padding to capacity assumes a fixed top-k"),
        "moe_input_jitter_eps": (off, "None: input jitter is not implemented"),
        "moe_router_force_load_balancing": (off, "False: benchmark-only random routing is not implemented"),
        "moe_enable_routing_replay": (off, "False: routing replay records fixed top-k indices"),
        "add_bias_linear": (off, "False: the gates are bias-free (Mixtral / Qwen); pass --disable-bias-linear"),
        "moe_router_dtype": (lambda v: v in (None, "fp32", "fp64"), "None, 'fp32' or 'fp64'"),
    }
    for name, (ok, allowed) in checks.items():
        if hasattr(config, name) and not ok(getattr(config, name)):
            raise ValueError(f"TransformerConfig.{name}={getattr(config, name)!r} is not supported by the "
                             f"variable-k router; allowed: {allowed}")


class VariableKRouter(MegatronModule):
    """Megatron router (RouterInterface) running moe_train's top-k / null-expert / Ada-K routing."""

    def __init__(self, config, pg_collection=None, *, routing: VariableKRouting, is_mtp_layer: bool = False,
                 layer_number: Optional[int] = None):
        super().__init__(config=config)
        _check_config(config)
        self.routing = routing
        self.moe_cfg = routing.moe_config(config)
        self.aux_coeffs = _loss_coefficients(config)
        self.is_mtp_layer = is_mtp_layer
        self.layer_number = layer_number
        if pg_collection is None:
            pg_collection = compat.default_pg_collection()
        self.tp_cp_group = pg_collection.tp_cp
        self.num_experts = E = config.num_moe_experts
        kind = router_class(routing.method)  # the router's facts (routing/base.py)
        self.num_null = self.moe_cfg.num_null_experts if kind.ranks_null_experts else 0
        D = config.hidden_size
        # moe_train's router on the meta device: its forward is the routing math, its parameters are never used.
        with torch.device("meta"):
            core = kind(D, self.moe_cfg)
        object.__setattr__(self, "_core", core)  # not a submodule: no parameters, no state-dict entries

        def param(rows: int) -> torch.nn.Parameter:
            p = torch.nn.Parameter(torch.empty(rows, D, dtype=torch.float32))
            if config.perform_initialization:
                config.init_method(p)
            p.data = p.data.to(config.params_dtype)
            p.sequence_parallel = config.sequence_parallel  # grads all-reduced over tp under SP
            return p

        self.weight = param(E)
        self.null_weight = param(self.num_null) if self.num_null else None
        self.allocator_weight = param(core.allocator.out_features) if kind.learns_k else None
        # identity / constant null experts (parallel/megatron/zero_compute.py); constant: v [m, D] from 0 as in
        # moe_train's NullExpertRouter
        self.null_kind = self.moe_cfg.null_kind
        self.null_values = None
        if self.null_kind == "constant":
            self.null_values = torch.nn.Parameter(torch.zeros(self.num_null, D, dtype=config.params_dtype))
            self.null_values.sequence_parallel = config.sequence_parallel
        self.last_plan: Optional[RoutingPlan] = None
        # Megatron's flex dispatcher with DeepEP turns probs into topk(probs, moe_router_topk) indices: experts of
        # probability 0 would be sent, picks beyond moe_router_topk lost. The layer with_variable_k builds
        # (ZeroComputeMoELayer) installs flex.deepep_topk (-1 for null slots) and sets deepep_indices_installed.
        self._needs_deepep_indices = (routing.dispatcher == "megatron" and config.moe_token_dispatcher_type == "flex"
                                      and getattr(config, "moe_flex_dispatcher_backend", "deepep") == "deepep")
        self.deepep_indices_installed = False
        # Megatron's selection-only expert bias (moe_router_enable_expert_bias): its buffer names, so a TopKRouter
        # checkpoint loads and finalize_model_grads updates it from local_tokens_per_expert (true picks only).
        if not self.moe_cfg.use_expert_bias:
            self.local_tokens_per_expert = self.expert_bias = None
        else:
            if "expert_bias" not in dict(core.named_buffers()):
                raise ValueError(f"moe_router_enable_expert_bias is not supported with method={routing.method!r}")
            self.register_buffer("local_tokens_per_expert", torch.zeros(E), persistent=False)
            self.register_buffer("expert_bias", torch.zeros(E))
            if "null_expert_bias" in dict(core.named_buffers()):  # null experts keep no offset of their own here
                self.register_buffer("null_expert_bias", torch.zeros(self.num_null), persistent=False)

    @classmethod
    def builder(cls, routing: VariableKRouting):
        """The RouterBuilder for MoESubmodules(router=...): Megatron calls it with config= and pg_collection=
        (0.19 also is_mtp_layer=)."""
        return functools.partial(cls, routing=routing)

    # ---- Megatron RouterInterface --------------------------------------------------------------------------

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    @property
    def max_slots(self) -> int:
        """K: the most true experts one token can get (sizes the dispatcher's slot view of routing_map)."""
        return router_class(self.routing.method).worst_true_experts(self.moe_cfg)

    def set_mode(self, mode: str, forced_action_T: Optional[torch.Tensor] = None) -> None:
        """Ada-K: greedy (argmax k) | sample (PPO rollouts) | forced (recompute log-probs of stored actions)."""
        if not router_class(self.routing.method).learns_k:
            raise ValueError(f"set_mode is for Ada-K routers; this router's method is {self.routing.method!r}")
        self._core.set_mode(mode, forced_action_T)

    def _params(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        params = {"gate.weight": self.weight.to(dtype)}
        if self.null_weight is not None:
            params["null_gate.weight"] = self.null_weight.to(dtype)
        if self.allocator_weight is not None:
            params["allocator.weight"] = self.allocator_weight.to(dtype)
        if self.expert_bias is not None:
            params["expert_bias"] = self.expert_bias.float()
            if hasattr(self, "null_expert_bias"):
                params["null_expert_bias"] = self.null_expert_bias
        return params

    def _router_dtype(self, x: torch.Tensor) -> torch.dtype:
        return {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, x.dtype)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """input [S, B, D] (or [T, D]); padding_mask [S, B] with True = padding (excluded from the balancing terms,
        still routed, as Megatron does). Returns (probs [T, E], routing_map [T, E])."""
        if self._needs_deepep_indices and not self.deepep_indices_installed:
            raise ValueError("VariableKRouter under moe_token_dispatcher_type='flex' (DeepEP backend) needs the layer "
                             "with_variable_k / get_gpt_layer_spec builds (ZeroComputeMoELayer), which hands DeepEP "
                             "the true experts and -1; a plain MoELayer would send experts of probability 0 and "
                             "drop picks beyond moe_router_topk")
        E = self.num_experts
        x_TD = input.reshape(-1, input.shape[-1])
        dtype = self._router_dtype(x_TD)
        plan: RoutingPlan = functional_call(self._core, self._params(dtype), (x_TD.to(dtype),))
        self.last_plan = plan  # Ada-K PPO reads action_T / log_prob_T / entropy_T from here
        T = x_TD.shape[0]
        if self.expert_bias is not None and torch.is_grad_enabled():  # as Megatron's TopKRouter: not in eval
            with torch.no_grad():
                true_TK = plan.expert_idx_TK >= 0
                if padding_mask is not None:
                    true_TK = true_TK & ~padding_mask.reshape(-1, 1).to(torch.bool)
                self.local_tokens_per_expert += counts_from_idx(torch.where(true_TK, plan.expert_idx_TK, -1), E)
        key_TK = torch.where(plan.expert_idx_TK >= 0, plan.expert_idx_TK, E)  # nulls -> a dropped column E
        routing_map = torch.zeros(T, E + 1, dtype=torch.bool, device=x_TD.device).scatter_(1, key_TK, True)[:, :E]
        probs = torch.zeros(T, E + 1, dtype=plan.weight_TK.dtype, device=x_TD.device).scatter(
            1, key_TK, plan.weight_TK)[:, :E]
        if self.config.moe_router_topk_scaling_factor:
            probs = probs * self.config.moe_router_topk_scaling_factor
            if plan.null_weight_TK is not None:  # every pick's gate is scaled alike (LongCat-Flash)
                self.last_plan = plan = dataclasses.replace(
                    plan, null_weight_TK=plan.null_weight_TK * self.config.moe_router_topk_scaling_factor)
        if self.training and torch.is_grad_enabled():
            padding_T = None if padding_mask is None else padding_mask.reshape(-1).to(torch.bool)
            probs = self._attach_losses(probs, plan, padding_T)
        return probs, routing_map.contiguous()

    # ---- balancing terms -----------------------------------------------------------------------------------

    def _record(self, name: str, value: torch.Tensor, reduce_group=None) -> None:
        compat.record_moe_metric(name, value, compat.logging_layer_number(self.layer_number, self.is_mtp_layer,
                                                                          self.config),
                                 compat.tracker_num_layers(self.config), reduce_group=reduce_group)

    def _attach_losses(self, probs: torch.Tensor, plan: RoutingPlan, padding_T: Optional[torch.Tensor]
                       ) -> torch.Tensor:
        """The balancing terms of routing/balancing.py on Megatron's groups: counts and token count summed over
        tp x cp, this rank's probabilities; padding (True) is routed but left out of both terms."""
        E, m = self.num_experts, self.num_null
        scaler = compat.aux_loss_autoscaler()
        true_TK = plan.expert_idx_TK >= 0
        if padding_T is not None:
            true_TK = true_TK & ~padding_T[:, None]
        T, device = plan.expert_idx_TK.shape[0], plan.expert_idx_TK.device
        n_valid = torch.tensor(float(T), device=device) if padding_T is None else (~padding_T).sum().float()
        counts_E = counts_from_idx(torch.where(true_TK, plan.expert_idx_TK, -1), E).float()
        per_token = self.config.calculate_per_token_loss
        # Every token makes exactly top_k picks over E + m: the ones that are not true are null picks.
        null_picks = (n_valid * self.moe_cfg.top_k - counts_E.sum()).reshape(1) if m else counts_E.new_zeros(0)
        stats = torch.cat([counts_E, null_picks, n_valid.reshape(1)])
        if compat.pg_size(self.tp_cp_group) > 1:  # counts of the whole sequence (tp x cp shards), as Megatron
            stats = stats.clone()
            all_reduce(stats, group=self.tp_cp_group)
        # Already a tp x cp total: logged without a reduce group (averaged over data parallel only).
        self._record("true_experts_per_token", stats[:E].sum() / stats[-1].clamp_min(1.0))

        coeff = self.aux_coeffs.get("aux_loss", 0.0)
        if coeff > 0:
            counts_N = null_bucket_counts(stats[:E], stats[E], m)
            aux = load_balancing_loss(plan.probs_TN, counts_N, num_tokens=stats[-1], padding_mask_T=padding_T,
                                      num_null=m)
            probs = scaler.apply(probs, aux * coeff * (n_valid if per_token else 1.0))
            self._record("load_balancing_loss", aux, self.tp_cp_group)

        z_coeff = self.config.moe_z_loss_coeff
        if z_coeff:
            z_coeff = z_coeff / compat.pg_size(self.tp_cp_group)
            # the plan's z-loss averages every token; with padding, the same term over the valid ones
            z = plan.z_loss if padding_T is None else router_z_loss(plan.logits_TN, padding_T)
            probs = scaler.apply(probs, z * z_coeff * (n_valid if per_token else 1.0))
            self._record("z_loss", z)
        return probs

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A Megatron top-k checkpoint has only ``weight``: AdaMoE's null gate starts as it repeated m/E times,
        Ada-K's allocator keeps its fresh initialisation (Ada-K trains it from scratch)."""
        if prefix + "weight" in state_dict:
            if self.null_weight is not None and prefix + "null_weight" not in state_dict:
                state_dict[prefix + "null_weight"] = null_gate_from_true(state_dict[prefix + "weight"],
                                                                         self.num_null, "num_moe_experts")
                logger.info("%snull_weight missing from the checkpoint: initialised from the true gate "
                            "(AdaMoE conversion)", prefix)
            if self.null_values is not None and prefix + "null_values" not in state_dict:
                state_dict[prefix + "null_values"] = self.null_values.detach().clone()
                logger.info("%snull_values missing from the checkpoint: keeping its initialisation", prefix)
            if self.allocator_weight is not None and prefix + "allocator_weight" not in state_dict:
                state_dict[prefix + "allocator_weight"] = self.allocator_weight.detach().clone()
                logger.info("%sallocator_weight missing from the checkpoint: keeping its initialisation", prefix)
        return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                             unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.routing, f.name)!r}" for f in dataclasses.fields(self.routing))
        return f"{fields}, experts={self.num_experts}"
