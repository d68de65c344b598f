"""LongCat-Flash's decoder layer (arXiv 2509.01322; transformers' LongcatFlashDecoderLayer), with HF's names.

One layer holds two attention sublayers (MLA with LongCat's latent scaling, model/mla.py), two dense SwiGLU MLPs
and one MoE block whose output joins the residual stream one sublayer later (the "shortcut"):

    h1 = x  + Attn_0(norm_in0(x))
    u  = norm_post0(h1)
    m  = MoE(u)                                  (computed from the FIRST sublayer's stream)
    h2 = h1 + MLP_0(u)
    h3 = h2 + Attn_1(norm_in1(h2))
    y  = h3 + MLP_1(norm_post1(h3)) + m          (added after the SECOND sublayer)

The MoE block is moe_layer.MoELayer: n FFN experts plus LongCat's zero-computation experts as null experts of the
``identity`` kind (a pick adds gate * u on the token's own rank, never dispatched; routing/zero_compute.py), softmax
over all n + z, the correction bias as selection-only biases, routed scaling, no renormalisation.
Every layer has the same structure (no dense-first layers). Shape legend: B batch, S sequence, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.config import ModelConfig
from moe_train.model.experts import SwiGLU
from moe_train.model.mla import MLAttention
from moe_train.model.moe_layer import MoELayer
from moe_train.model.norm import RMSNorm
from moe_train.routing import RoutingPlan


class LongcatDecoderLayer(nn.Module):
    """Two attention + dense-MLP sublayers and a shortcut MoE (module docstring); names as transformers'."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()

        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = nn.ModuleList(RMSNorm(D, eps) for _ in range(2))
        self.self_attn = nn.ModuleList(MLAttention(cfg) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(D, eps) for _ in range(2))
        self.mlps = nn.ModuleList(SwiGLU(D, cfg.dense_intermediate_size) for _ in range(2))
        self.moe = MoELayer(cfg)
        self.mlp = None  # no dense-instead-of-MoE layers (model.moe_layers() reads .moe)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan]:
        h_BSD = x_BSD + self.self_attn[0](self.input_layernorm[0](x_BSD), cos, sin)
        u_BSD = self.post_attention_layernorm[0](h_BSD)
        shortcut_BSD, plan = self.moe(u_BSD)
        h_BSD = h_BSD + self.mlps[0](u_BSD)
        h_BSD = h_BSD + self.self_attn[1](self.input_layernorm[1](h_BSD), cos, sin)
        return h_BSD + self.mlps[1](self.post_attention_layernorm[1](h_BSD)) + shortcut_BSD, plan
