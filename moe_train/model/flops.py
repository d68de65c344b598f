"""Whole-model FLOPs accounting, reported the way the AdaMoE / Ada-K papers report it.

Forward FLOPs per token (2 per multiply-add), summed over layers:
  attention projections  2*D*(H*Hd) [q] + 2*2*D*(G*Hd) [k, v] + 2*(H*Hd)*D [o]
  attention scores       2*2*ctx*H*Hd with ctx the mean causal context, (S+1)/2 for sequence length S
  MLA (DeepSeek)         q: 2*D*H*(Dn+Dr), or 2*D*Q + 2*Q*H*(Dn+Dr) with a q_lora_rank Q; kv: 2*D*(C+Dr) +
                         2*C*H*(Dn+Dv); o: 2*H*Dv*D; scores 2*ctx*H*(Dn+Dr) + 2*ctx*H*Dv (latent norms and RoPE
                         not counted, as no norm is)
  dense layers           first_k_dense_replace x (attention + 3 * 2*D*Fd), no router (DeepSeek)
  LongCat-Flash          every layer: 2 x MLA + 2 x 3 * 2*D*Fd (dense MLPs) + router + experts; its zero-computation
                         (identity) experts cost no expert FLOPs (k_true counts FFN experts only; their gate * x adds
                         D multiply-adds, uncounted like every expert's weighted combine)
  router                 2*D*(E+Z) (true + null experts) + 2*D*A for an Ada-K allocator with A actions
  experts                k_true * 3 * 2*D*F (SwiGLU: gate, up, down) for k_true true experts per token
  shared expert          3 * 2*D*Fs + 2*D (Qwen2-MoE; its sigmoid gate); DeepSeek: 3 * 2*D*(F*n_shared), ungated
  lm head (once)         2*D*V
Training costs 3x the forward. ``flops_vs_topk`` divides the FLOPs at the measured true experts per token by the
FLOPs of the same model with its baseline top-k (``moe.baseline_top_k``) and a plain top-k router; 1 - that ratio
is the "FLOPs reduction" of AdaMoE (arXiv 2406.13233; docs/references.md section 1).
"""

from __future__ import annotations

from typing import Sequence, Union

from moe_train.config import ModelConfig
from moe_train.routing.registry import router_class


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """One layer's attention: projections + scores over the mean causal context (module docstring)."""
    D, H, ctx = cfg.hidden_size, cfg.num_heads, (seq_len + 1) / 2
    if cfg.uses_mla:  # model/mla.py: per-head query/key width Dn + Dr, value width Dv, latent C, low-rank query Q
        qk, dv, C, Q = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        q = 2 * D * H * qk if Q is None else 2 * D * Q + 2 * Q * H * qk
        kv = 2 * D * (C + cfg.qk_rope_head_dim) + 2 * C * H * (cfg.qk_nope_head_dim + dv)
        return q + kv + 2 * H * dv * D + 2 * ctx * H * qk + 2 * ctx * H * dv
    Hd, G = cfg.resolved_head_dim, cfg.num_kv_heads
    return 2 * D * H * Hd + 2 * 2 * D * G * Hd + 2 * H * Hd * D + 2 * 2 * ctx * H * Hd


def forward_flops_per_token(cfg: ModelConfig, true_experts_per_layer: Union[float, Sequence[float]], seq_len: int,
                            include_routing_extras: bool = True) -> float:
    """Forward FLOPs of one token. ``true_experts_per_layer``: one mean for all MoE layers, or one per MoE layer
    (cfg.num_moe_layers: DeepSeek's dense-first layers have no router)."""
    L = cfg.num_moe_layers
    ks = [float(true_experts_per_layer)] * L if isinstance(true_experts_per_layer, (int, float)) \
        else [float(k) for k in true_experts_per_layer]
    if len(ks) != L:
        raise ValueError(f"true_experts_per_layer has {len(ks)} entries, the model has {L} MoE layers")
    D, F, moe = cfg.hidden_size, cfg.intermediate_size, cfg.moe
    attn = attention_flops_per_token(cfg, seq_len)
    # the gate, and with include_routing_extras the router's own extras (null gates, an Ada-K allocator)
    router = router_class(moe.router).gate_flops_per_token(moe, D, include_routing_extras)
    shared = (3 * 2 * D * cfg.shared_expert_intermediate_size + 2 * D) if cfg.shared_expert_intermediate_size else 0
    shared += 3 * 2 * D * F * cfg.n_shared_experts  # DeepSeek's ungated shared experts
    # LongCat-Flash (model/longcat.py): a second attention sublayer and two dense MLPs beside every MoE block
    longcat = attn + 2 * 3 * 2 * D * cfg.dense_intermediate_size if cfg.family == "longcat_flash" else 0
    per_layer = [attn + longcat + router + shared + k * 3 * 2 * D * F for k in ks]
    dense = cfg.first_k_dense_replace * (attn + 3 * 2 * D * cfg.dense_intermediate_size)
    return sum(per_layer) + dense + 2 * D * cfg.vocab_size


def flops_vs_topk(cfg: ModelConfig, true_experts_per_layer: Union[float, Sequence[float]], seq_len: int) -> float:
    """Ratio of this model's FLOPs to the baseline top-k model's (1.0 = same cost)."""
    base = forward_flops_per_token(cfg, float(cfg.moe.resolved_baseline_top_k), seq_len, include_routing_extras=False)
    return forward_flops_per_token(cfg, true_experts_per_layer, seq_len) / base


def expert_share(cfg: ModelConfig, seq_len: int) -> float:
    """Fraction of the baseline top-k model's FLOPs spent in routed experts (Mixtral-8x7B: ~0.88)."""
    k = float(cfg.moe.resolved_baseline_top_k)
    total = forward_flops_per_token(cfg, k, seq_len, include_routing_extras=False)
    return cfg.num_moe_layers * k * 3 * 2 * cfg.hidden_size * cfg.intermediate_size / total
