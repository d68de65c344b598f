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
  MLA attention      (DeepSeek-V2/V3, LongCat-Flash; model/mla.py) its input cD as for Linear (q_proj or q_a_proj
                     and kv_a_proj_with_mqa share it); low-rank query: q_a_layernorm as a latent norm over Q, q_b_proj's
                     input cQ; kv_a_layernorm as a latent norm over C (in fp32 its x.float() is the split view itself,
                     so it keeps the whole kv_a output alive: + 4Dr), kv_b_proj's input cC; SDPA's q, k (the cat of
                     nope and roped parts, c H (Dn+Dr) each), v (a view: keeps kv_b's whole output, c H (Dn+Dv)),
                     output c H Dv, log-sum-exp 4H; o_proj's input c H Dv (a copy: the cat lays q out [B, H, S, .],
                     so the output comes back in that layout and the transpose-reshape copies it). SDPA as its fused
                     kernels save (CPU flash; CUDA flash / memory-efficient); CPU runs the math path when Dn + Dr !=
                     Dv, which keeps the H S x S probabilities: not modelled (the planner plans GPU jobs)
  latent norm over W 4W (its fp32 input) + 4 (rstd) + cW (normalised, when its weight trains)
  MoE input          cD, saved once for the router's gate, shared experts, LongCat's first dense MLP and identity
                     nulls (under autocast: once per casting op that trains)
  router             probs 4Z + fp32 logits 4Z + sort order 8Z (int64, stable sort
                     over the Z scored experts) + log-sum-exp 4 + slot masks/gates 9 + 5K   (Z = E + null experts);
                     sigmoid scores (DeepSeek-V3): + the normalised distribution the plan holds 4Z + its sum 8;
                     group-limited selection keeps nothing more (its group scores die with the selection);
                     null router: its one GEMM's concatenated gate weight Z D c (per layer);
                     top-p router (K = k_max): probs, logits, sort order 8Z, log-sum-exp as above + keep mask K
                     (+ with norm_topk_prob: where-mask 1, sum 4, masked gates 4K); its entropy term's xlogy saves
                     the probs themselves (nothing more); its plan's ids are a new [T, K] (8K), not the sort order
  identity nulls     (LongCat-Flash's zero-computation experts) the summed null gate in x's dtype r (+ x itself, rD,
                     under autocast, where the other consumers save only their bf16 copies, or if none saves it)
  Ada-K allocator    fp32 input copy 4D (when c = 2) + log-probs 4A
  experts, per row R x cD (w_gate/w_up or LoRA train) + gate, up, silu, h: 4cF (silu input, product operands; h only
                     when w_down or its LoRA trains: else 3cF) + 3 r_lora c with LoRA
  combine, per row N y cD (one process: and the weighted y, 2cD) + indices 16
  shared expert      4c Fs + cD-free (reads the router's input) + gate c; DeepSeek's ungated shared experts 4c Fs
                     (+ cD per projection under autocast: gate_proj and up_proj cast their input apiece)
  dense SwiGLU       (DeepSeek's first_k_dense_replace layers, LongCat's two per layer) input cD (two copies under
                     autocast) + gate, up, silu, h: 4 c Fd
  LongCat layer      two norms + MLA + norm + dense SwiGLU (its input shared with the MoE block) + norm + MLA + norm
                     + dense SwiGLU, and one MoE block (router, experts, combine, identity nulls) on the first stream
  head               final norm as RMSNorm, lm_head input cD, log-softmax 4V (fp32 cross-entropy), ids 8, and the
                     logits cV (the trainer holds them to the end of the micro-batch)
Under autocast the bf16 copies of the weights the backward needs are saved too (per layer, not per token).
Activation checkpointing (non-reentrant, per decoder layer) keeps each layer's input rD and its routing plan
(the trainer holds the plans to the end of the step): probs 4Z (twice with sigmoid scores), logits 4Z, expert ids
8K (the top-k router's ids are a view of its sort order: 8Z), gates 4K, and for identity nulls their ids and gates 12K.
A dense layer keeps its input only. The backward of a layer holds, besides its saved tensors, the gradients of its
widest tensors: three R x F (experts) or T x Fd (a dense SwiGLU) in c, two T x D in r.
A layer kind this module does not know raises PlanError naming it: a new family needs its formula here.
Shape legend: T tokens, D hidden, F expert width (Fs shared, Fd dense MLP), H heads, G kv heads, Hd head dim, V vocab,
E experts (local to the rank where stated), Z scored experts, K slots, A allocator actions, R rows received, N rows
sent; MLA: Q q_lora_rank, C kv_lora_rank, Dn / Dr / Dv the nope, rope and value head dims (model/mla.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_train.model.decoder import Attention, DecoderLayer
from moe_train.model.experts import GroupedExperts, SwiGLU
from moe_train.model.longcat import LongcatDecoderLayer
from moe_train.model.lora import LoRAGroupedExperts, LoRALinear
from moe_train.model.mla import MLAttention
from moe_train.planner.shard import PlanError
from moe_train.routing.base import BaseRouter


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
    bwd_per_row: float = 0.0  # the backward's widest gradients per received row (three R x F in c)
    bwd_per_token: float = 0.0  # ... per token, of a dense SwiGLU (three T x Fd in c); the two T x D are memory.py's

    def bytes(self, T: float, R: float, N: float) -> float:
        return self.per_token * T + self.per_row_recv * R + self.per_row_sent * N + self.fixed

    def backward_widest(self, T: float, R: float) -> float:
        """The widest gradients of this layer's backward (expert rows and a dense MLP run at different times)."""
        return max(self.bwd_per_row * R, self.bwd_per_token * T)


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
    if isinstance(mod, LoRALinear):
        return mod.base, mod.base.weight.requires_grad, mod.lora_A.shape[0] if mod.lora_A.requires_grad else 0
    if isinstance(mod, nn.Linear):
        return mod, mod.weight.requires_grad, 0
    raise PlanError(f"no activation formula for projection {type(mod).__name__}: add it to "
                    "moe_train/planner/activations.py")


def _norm(norm: nn.Module, reg: Regime, D: int) -> float:
    return 4 * D + 4 + (reg.r * D if norm.weight.requires_grad else 0)


def _input_copies(reg: Regime, projs) -> int:
    """How many copies of one input its consumers (base, weight trains, LoRA rank) save: one shared tensor, or
    under autocast one cast per op that needs it (base and LoRA A separately)."""
    if reg.autocast:
        return sum(int(w) + int(r > 0) for _, w, r in projs)
    return int(any(w or r > 0 for _, w, r in projs))


def _latent_norm(norm: nn.Module, reg: Regime, W: int) -> float:
    """An RMSNorm over a projection's output of width W (MLA's q_a / kv_a_layernorm): its fp32 input, rstd, and the
    normalised values in the compute dtype for its weight's gradient."""
    return 4 * W + 4 + (reg.c * W if norm.weight.requires_grad else 0)


def _attention(attn: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per-token bytes, autocast weight-cast bytes) of a GQA Attention (moe_train/model/decoder.py) or MLA."""
    if _orig_type(attn) is MLAttention:
        return _mla(attn, reg)
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


def _mla(attn: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per-token bytes, autocast weight-cast bytes) of multi-head latent attention (model/mla.py; docstring)."""
    H, Dn, Dr, Dv, C = attn.num_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
    low_rank_q = hasattr(attn, "q_a_proj")
    names = ["q_a_proj", "q_b_proj"] if low_rank_q else ["q_proj"]
    names += ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    projs = {n: _linear_parts(getattr(attn, n)) for n in names}
    D = projs["kv_a_proj_with_mqa"][0].in_features
    first = [projs[n] for n in ("q_a_proj" if low_rank_q else "q_proj", "kv_a_proj_with_mqa")]
    per_token = _input_copies(reg, first) * reg.c * D
    if low_rank_q:
        Q = attn.q_a_layernorm.weight.shape[0]
        per_token += _latent_norm(attn.q_a_layernorm, reg, Q) + _input_copies(reg, [projs["q_b_proj"]]) * reg.c * Q
    # in fp32 x.float() is the [C] view itself: the norm saves the whole kv_a output, rotary key included
    per_token += _latent_norm(attn.kv_a_layernorm, reg, C) + (4 * Dr if reg.c == 4 else 0)
    per_token += _input_copies(reg, [projs["kv_b_proj"]]) * reg.c * C
    # SDPA: q and k (cats, [B, H, S, Dn + Dr]), v (a view of kv_b's [nope; value] output), its output, lse
    per_token += reg.c * (2 * H * (Dn + Dr) + H * (Dn + Dv) + H * Dv) + 4 * H
    _, o_trains, o_lora = projs["o_proj"]
    per_token += reg.c * H * Dv if o_trains or o_lora else 0  # o_proj's input: the transpose-reshape copy
    per_token += sum(r for _, _, r in projs.values()) * reg.c  # x A of every adapted projection
    casts = sum(base.weight.numel() * reg.c for base, _, _ in projs.values()) if reg.autocast else 0
    return per_token, casts


@dataclass
class RouterActivations:
    per_token: float  # saved per token
    fixed: float  # per layer
    plan_per_token: float  # what the routing plan the trainer holds keeps per token (checkpointing)
    Z: int
    K: int
    inputs: list  # its gate as a consumer of the layer's MoE input: [(base, weight trains, LoRA rank)]


def _router(router: nn.Module, reg: Regime, D: int) -> RouterActivations:
    """The saved bytes of a known router, without its input (the MoE block counts that once: docstring); each router
    class declares its own (routing/base.py BaseRouter.activation_bytes)."""
    if not isinstance(router, BaseRouter):
        raise PlanError(f"no activation formula for router {type(router).__name__}: derive it from "
                        "moe_train.routing.base.BaseRouter and give it activation_bytes")
    b = router.activation_bytes(D, reg.c)
    return RouterActivations(per_token=b.per_token, fixed=b.fixed, plan_per_token=b.plan_per_token, Z=b.Z, K=b.K,
                             inputs=[(None, _trains(*router.gate_weights()), 0)])


def _experts(experts: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per received row, autocast weight casts) of GroupedExperts / LoRAGroupedExperts."""
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


def _swiglu(mlp: nn.Module, reg: Regime) -> tuple[float, float, list]:
    """(per-token bytes without its input, autocast casts, its input's consumers) of a SwiGLU (model/experts.py):
    gate output, silu, up output, h (when down_proj trains), x A per adapted projection."""
    if _orig_type(mlp) is not SwiGLU:
        raise PlanError(f"no activation formula for dense MLP {_orig_type(mlp).__name__}: add it to "
                        "moe_train/planner/activations.py")
    gate, up, down = (_linear_parts(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    F = gate[0].out_features
    per_token = 3 * reg.c * F + (reg.c * F if down[1] or down[2] else 0) + (gate[2] + up[2] + down[2]) * reg.c
    casts = sum(b.weight.numel() * reg.c for b, _, _ in (gate, up, down)) if reg.autocast else 0
    return per_token, casts, [gate, up]


def _dense_mlp(mlp: nn.Module, reg: Regime) -> tuple[float, float]:
    """(per token, autocast casts) of a dense SwiGLU with its input (DeepSeek's first_k_dense_replace layers)."""
    per_token, casts, inputs = _swiglu(mlp, reg)
    D = inputs[0][0].in_features
    return per_token + _input_copies(reg, inputs) * reg.c * D, casts


@dataclass
class MoEActivations:
    per_token: float
    per_row_recv: float
    per_row_sent: float
    fixed: float
    plan_per_token: float
    bwd_per_row: float


def _moe_block(moe: nn.Module, reg: Regime, D: int, co_inputs: list) -> MoEActivations:
    """An MoELayer (router, experts, combine, shared experts, identity nulls) and its input, which the router, the
    shared experts, ``co_inputs`` (LongCat's first dense MLP) and an identity null term read: saved once, or under
    autocast one bf16 copy per casting op plus the original where the identity term keeps it."""
    router = _router(moe.router, reg, D)
    exp_row, exp_casts = _experts(moe.experts, reg)
    per_token, fixed, inputs = router.per_token, router.fixed + exp_casts, router.inputs + list(co_inputs)
    if moe.shared_expert is not None:  # Qwen2-MoE: a sigmoid-gated shared expert
        _, casts, shared_in = _swiglu(moe.shared_expert, reg)
        Fs = shared_in[0][0].out_features
        per_token, fixed = per_token + 4 * reg.c * Fs + reg.c, fixed + casts  # + its sigmoid gate's output
        inputs = inputs + shared_in + [_linear_parts(moe.shared_expert_gate)]
    if getattr(moe, "shared_experts", None) is not None:  # DeepSeek: ungated shared experts
        tok, casts, shared_in = _swiglu(moe.shared_experts, reg)
        per_token, fixed, inputs = per_token + tok, fixed + casts, inputs + shared_in
    identity = moe.router.moe_cfg.null_kind == "identity"  # only a router with null experts has another kind
    per_token += _input_copies(reg, inputs) * reg.c * D
    if identity:  # x * sum of null gates (in x's dtype): saves the sum, and x itself where nothing else did
        per_token += reg.r + (reg.r * D if reg.autocast or not _input_copies(reg, inputs) else 0)
    # the combine keeps y (and, in one process, the weighted y too: what the local dispatcher's mul saves) + ids
    local = type(moe.dispatcher).__name__ == "LocalDispatcher"
    sent_row = (2 if local else 1) * reg.c * D + 16
    F = moe.experts.w_gate.shape[-1]
    return MoEActivations(per_token=per_token, per_row_recv=exp_row, per_row_sent=sent_row, fixed=fixed,
                          plan_per_token=router.plan_per_token, bwd_per_row=3 * reg.c * F)


def layer_activations(layer: nn.Module, reg: Regime) -> LayerActivations:
    """The formula for one decoder layer: DecoderLayer (model/decoder.py: GQA or MLA, then an MoE block or a dense
    SwiGLU) or LongCat-Flash's LongcatDecoderLayer (model/longcat.py)."""
    if _orig_type(layer) is LongcatDecoderLayer:
        return _longcat_layer(layer, reg)
    if _orig_type(layer) is not DecoderLayer:
        raise PlanError(f"no activation formula for decoder layer {_orig_type(layer).__name__} (its family's layer "
                        "kind): add it to moe_train/planner/activations.py")
    D = layer.input_layernorm.weight.shape[0]
    attn_tok, attn_casts = _attention(layer.self_attn, reg)
    per_token = _norm(layer.input_layernorm, reg, D) + attn_tok + _norm(layer.post_attention_layernorm, reg, D)
    if layer.moe is None:  # a dense SwiGLU layer (DeepSeek's first_k_dense_replace): all T tokens through one MLP
        mlp_tok, mlp_casts = _dense_mlp(layer.mlp, reg)
        Fd = _linear_parts(layer.mlp.gate_proj)[0].out_features
        return LayerActivations(per_token=per_token + mlp_tok, per_row_recv=0.0, per_row_sent=0.0,
                                fixed=attn_casts + mlp_casts, ckpt_per_token=reg.r * D, bwd_per_token=3 * reg.c * Fd)
    moe = _moe_block(layer.moe, reg, D, [])
    return LayerActivations(per_token=per_token + moe.per_token, per_row_recv=moe.per_row_recv,
                            per_row_sent=moe.per_row_sent, fixed=attn_casts + moe.fixed,
                            ckpt_per_token=reg.r * D + moe.plan_per_token, bwd_per_row=moe.bwd_per_row)


def _longcat_layer(layer: nn.Module, reg: Regime) -> LayerActivations:
    """Two MLA sublayers with their dense SwiGLUs, and the shortcut MoE block reading the first sublayer's stream
    (model/longcat.py): the MoE block and the first dense MLP share their input."""
    D = layer.input_layernorm[0].weight.shape[0]
    per_token, fixed, widest = 0.0, 0.0, 0.0
    for i in range(2):
        attn_tok, attn_casts = _attention(layer.self_attn[i], reg)
        mlp_tok, mlp_casts, mlp_in = _swiglu(layer.mlps[i], reg)
        per_token += _norm(layer.input_layernorm[i], reg, D) + attn_tok + _norm(layer.post_attention_layernorm[i],
                                                                                 reg, D) + mlp_tok
        fixed += attn_casts + mlp_casts
        widest = max(widest, 3 * reg.c * mlp_in[0][0].out_features)
        if i == 1:
            per_token += _input_copies(reg, mlp_in) * reg.c * D
    moe = _moe_block(layer.moe, reg, D, _swiglu(layer.mlps[0], reg)[2])
    return LayerActivations(per_token=per_token + moe.per_token, per_row_recv=moe.per_row_recv,
                            per_row_sent=moe.per_row_sent, fixed=fixed + moe.fixed,
                            ckpt_per_token=reg.r * D + moe.plan_per_token, bwd_per_row=moe.bwd_per_row,
                            bwd_per_token=widest)


def head_activations(model: nn.Module, reg: Regime) -> float:
    """Per-token bytes of the embedding ids, final norm, lm_head input and the fp32 log-softmax."""
    D = model.norm.weight.shape[0]
    V = model.lm_head.weight.shape[0]
    lm_in = reg.c * D if model.lm_head.weight.requires_grad else 0
    # + the logits themselves (c V): the trainer's local variable keeps them alive through the backward
    return 8 + _norm(model.norm, reg, D) + lm_in + 4 * V + reg.c * V


def head_casts(model: nn.Module, reg: Regime) -> float:
    return model.lm_head.weight.numel() * reg.c if reg.autocast else 0
