"""Activation memory: the bytes autograd keeps for backward, one formula per layer kind, read off what each op saves.

Written from the tensors torch 2.13 saves for this model's ops (listed with saved_tensors_hooks) and checked
against measured peaks at small sizes (tests/test_planner_memory.py). Widths per token (T) or per expert row
(R rows an experts module computes; N rows a rank sends), in bytes:

  precision regime   c = compute dtype bytes (linear outputs), r = residual-stream bytes;
                     fp32: c = r = 4; FSDP2 bf16 policy / bf16 base: c = r = 2; autocast (one process): c = 2, r = 4
  RMSNorm            4D (its input as fp32: x.float()) + 4 (rstd) + rD (normalised output, when its weight trains)
  Linear / LoRA      its input, cD, when its weight (or LoRA A) trains: shared by q/k/v except under autocast, where
                     each op casts (and saves) its own copy; LoRA adds r_lora*c (x A) per adapted projection
  GQA attention      q, k after RoPE, v, output: c(2 H Hd + 2 G Hd); log-sum-exp 4H (flash-style SDPA)
  router             its input cD (gate trains) + probs 4Z + fp32 logits 4Z + sort order 8Z (int64, stable sort
                     over the Z scored experts) + log-sum-exp 4 + slot masks/gates 9 + 5K   (Z = E + null experts)
  Ada-K allocator    fp32 input copy 4D (when c = 2) + log-probs 4A
  experts, per row R x cD (w_gate/w_up or LoRA train) + gate, up, silu, h: 4cF (silu input, product operands; h only
                     when w_down or its LoRA trains: else 3cF) + 3 r_lora c with LoRA
  combine, per row N y cD (one process: and the weighted y, 2cD) + indices 16
  shared expert      4c Fs + cD-free (reads the router's input) + gate c
  head               final norm as RMSNorm, lm_head input cD, log-softmax 4V (fp32 cross-entropy), ids 8, and the
                     logits cV (the trainer holds them to the end of the micro-batch)
Under autocast the bf16 copies of the weights the backward needs are saved too (per layer, not per token).
Activation checkpointing (non-reentrant, per decoder layer) keeps each layer's input rD and its routing plan
(the trainer holds the plans to the end of the step): probs 4Z, logits 4Z, expert ids 8K, gates 4K.
A layer kind this module does not know raises PlanError naming it: a new family needs its formula here.
Shape legend: T tokens, D hidden, F expert width (Fs shared), H heads, G kv heads, Hd head dim, V vocab, E experts
(local to the rank where stated), Z scored experts, K slots, A allocator actions, R rows received, N rows sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_train.planner.shard import PlanError


@dataclass(frozen=True)
class Regime:
    c: int  # compute dtype bytes
    r: int  # residual stream bytes
    autocast: bool  # per-op input casts and saved weight casts


@dataclass
class LayerActivations:
    """Saved bytes of one decoder layer at T tokens, R rows received by its experts, N rows sent."""

    per_token: float  # bytes that scale with T (attention, norms, router)
    per_row_recv: float  # bytes per received expert row
    per_row_sent: float  # bytes per sent row (combine side)
    fixed: float  # per layer, independent of tokens (autocast weight casts)
    ckpt_per_token: float  # what activation checkpointing keeps per token (input + routing plan)

    def bytes(self, T: float, R: float, N: float) -> float:
        return self.per_token * T + self.per_row_recv * R + self.per_row_sent * N + self.fixed


def _orig_type(mod: nn.Module) -> type:
    """The module's own class: FSDP2's fully_shard swaps in a subclass FSDP<Class>(FSDPModule, Class)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(mod, FSDPModule):
        return next(b for b in type(mod).__bases__ if not issubclass(b, FSDPModule))
    return type(mod)


def _trains(*params) -> bool:
    return any(p is not None and p.requires_grad for p in params)


def _linear_parts(mod: nn.Module) -> tuple[nn.Module, bool, int]:
    """(base nn.Linear, its weight trains, LoRA rank or 0) of a Linear or LoRALinear."""
    from moe_train.model.lora import LoRALinear

    if isinstance(mod, LoRALinear):
        return mod.base, mod.base.weight.requires_grad, mod.lora_A.shape[0] if mod.lora_A.requires_grad else 0
    if isinstance(mod, nn.Linear):
        return mod, mod.weight.requires_grad, 0
    raise PlanError(f"no activation formula for projection {type(mod).__name__}: add it to "
                    "moe_train/planner/activations.py")


def _norm(norm: nn.Module, reg: Regime, D: int) -> float:
    return 4 * D + 4 + (reg.r * D if norm.weight.requires_grad else 0)


def _attention(attn: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per-token bytes, autocast weight-cast bytes) of a GQA Attention (moe_train/model/decoder.py)."""
    from moe_train.model.decoder import Attention

    if _orig_type(attn) is not Attention:
        raise PlanError(f"no activation formula for attention {type(attn).__name__} (family with a new attention): "
                        "add it to moe_train/planner/activations.py")
    H, G, Hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    projs = [_linear_parts(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    D = projs[0][0].in_features
    need_in = [w or r > 0 for _, w, r in projs[:3]]
    if reg.autocast:  # each op casts its input: one saved copy per consumer (base and LoRA A separately)
        copies = sum(int(w) + int(r > 0) for _, w, r in projs[:3])
    else:
        copies = int(any(need_in))
    lora = sum(r for _, _, r in projs)
    per_token = copies * reg.c * D + reg.c * (2 * H * Hd + 2 * G * Hd) + 4 * H + lora * reg.c
    for norm, heads in ((getattr(attn, "q_norm", None), H), (getattr(attn, "k_norm", None), G)):
        if norm is not None:  # Qwen3-MoE per-head RMSNorm of q and k before RoPE (an RMSNorm over Hd per head)
            per_token += heads * _norm(norm, reg, Hd)
    casts = sum(base.weight.numel() * reg.c for base, _, _ in projs) if reg.autocast else 0
    return per_token, casts


def _router(router: nn.Module, reg: Regime, D: int) -> tuple[float, int, int]:
    """(per-token bytes, scored width Z, slots K) of a known router."""
    from moe_train.routing.adak import AdaKRouter
    from moe_train.routing.null_experts import NullExpertRouter
    from moe_train.routing.topk import TopKRouter

    if isinstance(router, NullExpertRouter):
        Z, K = router.num_experts + router.num_null, router.top_k
        gate_trains = _trains(router.gate.weight, router.null_gate.weight)
    elif isinstance(router, TopKRouter):
        Z, K = router.num_experts, router.top_k
        gate_trains = _trains(router.gate.weight)
    elif isinstance(router, AdaKRouter):
        Z, K = router.num_experts, router.k_max
        gate_trains = _trains(router.gate.weight)
    else:
        raise PlanError(f"no activation formula for router {type(router).__name__}: add it to "
                        "moe_train/planner/activations.py")
    per_token = (reg.c * D if gate_trains else 0) + 4 * Z + 4 * Z + 8 * Z + 4 + 9 + 5 * K
    if isinstance(router, AdaKRouter):
        A = router.k_max - router.k_min + 1
        per_token += (4 * D if reg.c != 4 else 0) + 4 * A
    return per_token, Z, K


def _experts(experts: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per received row, autocast weight casts) of GroupedExperts / LoRAGroupedExperts."""
    from moe_train.model.experts import GroupedExperts
    from moe_train.model.lora import LoRAGroupedExperts

    if _orig_type(experts) not in (GroupedExperts, LoRAGroupedExperts):
        raise PlanError(f"no activation formula for experts {type(experts).__name__}: add it to "
                        "moe_train/planner/activations.py")
    E_local, D, F = experts.w_gate.shape
    lora = experts.lora_gate_A.shape[-1] if isinstance(experts, LoRAGroupedExperts) else 0
    in_trains = _trains(experts.w_gate, experts.w_up) or lora > 0
    down_trains = _trains(experts.w_down) or lora > 0
    x_copies = (2 if reg.autocast else 1) if in_trains else 0
    per_row = x_copies * reg.c * D + (4 if down_trains else 3) * reg.c * F + 3 * lora * reg.c
    casts = 3 * E_local * D * F * reg.c if reg.autocast else 0
    return per_row, casts


def _dense_mlp(mlp: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per token, autocast casts) of a dense SwiGLU (model/experts.py): input, gate, up, silu, h as for experts."""
    from moe_train.model.experts import SwiGLU

    if _orig_type(mlp) is not SwiGLU:
        raise PlanError(f"no activation formula for dense MLP {_orig_type(mlp).__name__}: add it to "
                        "moe_train/planner/activations.py")
    F = mlp.gate_proj.out_features
    D = mlp.gate_proj.in_features
    projs = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    per_token = (reg.c * D if _trains(mlp.gate_proj.weight, mlp.up_proj.weight) else 0) + 4 * reg.c * F
    casts = sum(p.weight.numel() * reg.c for p in projs) if reg.autocast else 0
    return per_token, casts


def layer_activations(layer: nn.Module, reg: Regime) -> LayerActivations:
    """The formula for one decoder layer (moe_train/model/decoder.py DecoderLayer with an MoELayer)."""
    from moe_train.model.decoder import DecoderLayer

    if _orig_type(layer) is not DecoderLayer:
        raise PlanError(f"no activation formula for decoder layer {_orig_type(layer).__name__} (its family's layer "
                        "kind): add it to moe_train/planner/activations.py")
    D = layer.input_layernorm.weight.shape[0]
    attn_tok, attn_casts = _attention(layer.self_attn, reg)
    moe = layer.moe
    if moe is None:  # a dense SwiGLU layer (DeepSeek's first_k_dense_replace): all T tokens through one MLP
        mlp_row, mlp_casts = _dense_mlp(layer.mlp, reg)
        per_token = _norm(layer.input_layernorm, reg, D) + attn_tok + _norm(layer.post_attention_layernorm, reg, D)
        return LayerActivations(per_token=per_token + mlp_row, per_row_recv=0.0, per_row_sent=0.0,
                                fixed=attn_casts + mlp_casts, ckpt_per_token=reg.r * D)
    router_tok, Z, K = _router(moe.router, reg, D)
    exp_row, exp_casts = _experts(moe.experts, reg)
    per_token = _norm(layer.input_layernorm, reg, D) + attn_tok + _norm(layer.post_attention_layernorm, reg, D) \
        + router_tok
    if moe.shared_expert is not None:
        Fs = moe.shared_expert.gate_proj.out_features
        per_token += 4 * reg.c * Fs + reg.c
    # the combine keeps y (and, in one process, the weighted y too: what the local dispatcher's mul saves) + ids
    local = type(moe.dispatcher).__name__ == "LocalDispatcher"
    sent_row = (2 if local else 1) * reg.c * D + 16
    ckpt = reg.r * D + 4 * Z + 4 * Z + 8 * K + 4 * K
    return LayerActivations(per_token=per_token, per_row_recv=exp_row, per_row_sent=sent_row,
                            fixed=attn_casts + exp_casts, ckpt_per_token=ckpt)


def head_activations(model: nn.Module, reg: Regime) -> float:
    """Per-token bytes of the embedding ids, final norm, lm_head input and the fp32 log-softmax."""
    D = model.norm.weight.shape[0]
    V = model.lm_head.weight.shape[0]
    lm_in = reg.c * D if model.lm_head.weight.requires_grad else 0
    # + the logits themselves (c V): the trainer's local variable keeps them alive through the backward
    return 8 + _norm(model.norm, reg, D) + lm_in + 4 * V + reg.c * V


def head_casts(model: nn.Module, reg: Regime) -> float:
    return model.lm_head.weight.numel() * reg.c if reg.autocast else 0
