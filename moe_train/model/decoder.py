"""A decoder-only MoE language model in the Mixtral family (and the Qwen2-MoE variant), in one sitting.

    tokens -> embed -> L x [ x + Attn(RMSNorm(x)) ; x + MoE(RMSNorm(x)) ] -> RMSNorm -> lm_head -> logits

Attention: RoPE (rotate-half convention, as in Hugging Face), grouped-query heads, causal
scaled_dot_product_attention. MoE: see moe_layer.py; the Qwen2-MoE variant adds q/k/v biases and a shared expert
with a sigmoid gate and uses norm_topk_prob from its config. DeepSeek-V2 / V3 (config.MLA_FAMILIES): multi-head
latent attention (mla.py) with interleaved, optionally yarn-scaled RoPE (rope.py), dense SwiGLU MLPs in the first
first_k_dense_replace layers, ungated shared experts, and their router conventions (routing/scores.py).
Qwen3-MoE: an RMSNorm over each query / key head before RoPE, attention_bias on q/k/v and o. LongCat-Flash: its own
layer (longcat.py: two MLA sublayers, two dense MLPs, a shortcut MoE with identity zero-computation experts).
Parameter names follow Hugging Face's where a layer has one (q_proj, input_layernorm, ...) so the interchange
in moe_train.io is a rename plus the expert stacking.
Shape legend: B batch, S sequence, D hidden, H heads, G kv heads, Hd head dim, V vocab, T = B*S.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from moe_train.config import ModelConfig, validate_model
from moe_train.model.experts import SwiGLU
from moe_train.model.init import base_seed, init_weights_
from moe_train.model.longcat import LongcatDecoderLayer
from moe_train.model.mla import MLAttention
from moe_train.model.moe_layer import MoELayer
from moe_train.model.norm import RMSNorm
from moe_train.model.rope import RotaryEmbedding, apply_rope, rotary_for  # noqa: F401 (RotaryEmbedding: users import it from here)
from moe_train.routing import RoutingPlan


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        D, Hd = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * Hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * Hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * Hd, bias=cfg.attention_bias)
        # Qwen3-MoE: attention_bias covers the output projection too, and q / k get an RMSNorm over each head
        # (before RoPE). The other families have neither.
        qwen3 = cfg.family == "qwen3_moe"
        self.o_proj = nn.Linear(self.num_heads * Hd, D, bias=cfg.attention_bias and qwen3)
        self.q_norm = RMSNorm(Hd, cfg.rms_norm_eps) if qwen3 else None
        self.k_norm = RMSNorm(Hd, cfg.rms_norm_eps) if qwen3 else None

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHHd = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k_BSGHd = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHHd, k_BSGHd = self.q_norm(q_BSHHd), self.k_norm(k_BSGHd)
        q, k = q_BSHHd.transpose(1, 2), k_BSGHd.transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Attention (GQA, or MLA for the DeepSeek families) then an MoE layer, or a dense SwiGLU MLP for the first
    ``first_k_dense_replace`` layers (DeepSeek): exactly one of ``moe`` / ``mlp`` is set; a dense layer routes
    nothing and returns no plan."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg) if cfg.uses_mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.is_moe_layer(layer_idx)
        self.moe = MoELayer(cfg) if moe else None
        self.mlp = None if moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x_BSD, cos, sin) -> tuple[torch.Tensor, Optional[RoutingPlan]]:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin)
        if self.moe is None:
            return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD)), None
        y_BSD, plan = self.moe(self.post_attention_layernorm(x_BSD))
        return x_BSD + y_BSD, plan


def layer_class(cfg: ModelConfig) -> type:
    """The decoder layer of the family: LongCat-Flash's two-attention shortcut layer (longcat.py), else DecoderLayer."""
    if cfg.family == "longcat_flash":
        return LongcatDecoderLayer
    return DecoderLayer


class MoETransformer(nn.Module):
    """``model(input_ids_BS)`` -> logits_BSV; ``model(input_ids_BS, return_plans=True)`` -> (logits, plans)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # one draw of the global generator before anything else draws (submodules' own default inits do on the
        # CPU, not on the meta device): the same seed on every path
        self.init_seed = base_seed()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = rotary_for(cfg)
        self.layers = nn.ModuleList(layer_class(cfg)(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Recompute each decoder layer in backward instead of keeping its activations (train.activation_checkpointing).
        # A flag, not a wrapper module, so parameter names (and checkpoints) do not depend on it.
        self.activation_checkpointing = False
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every tensor at its initial value (model/init.py: one generator per tensor, seeded by ``init_seed`` and
        its name, so a model materialised shard by shard on any number of ranks holds the same values). On the meta
        device nothing is drawn: train/build.py fills each rank's shards from the same rule."""
        if self.embed_tokens.weight.is_meta:
            return
        init_weights_(self, self.init_seed, self.config.init_std)

    def forward(self, input_ids_BS: torch.Tensor, *, return_plans: bool = False):
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids_BS.shape)}")
        S = input_ids_BS.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rotary(torch.arange(S, device=input_ids_BS.device))
        x_BSD = self.embed_tokens(input_ids_BS)
        plans: list[RoutingPlan] = []
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: any output structure; the RNG state is restored, so sampled routing repeats
                x_BSD, plan = torch.utils.checkpoint.checkpoint(layer, x_BSD, cos, sin, use_reentrant=False)
            else:
                x_BSD, plan = layer(x_BSD, cos, sin)
            if plan is not None:  # dense layers route nothing: plans (and routers()) cover the MoE layers
                plans.append(plan)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        return (logits_BSV, plans) if return_plans else logits_BSV

    def moe_layers(self) -> list[DecoderLayer]:
        """The decoder layers with an MoE block (all but DeepSeek's dense-first layers), in order."""
        return [layer for layer in self.layers if layer.moe is not None]

    def routers(self) -> list[nn.Module]:
        """One router per MoE layer, in the order of the plans forward returns."""
        return [layer.moe.router for layer in self.moe_layers()]


def build_model(cfg: ModelConfig, device: Optional[torch.device] = None) -> MoETransformer:
    validate_model(cfg)
    model = MoETransformer(cfg)
    return model.to(device) if device is not None else model
