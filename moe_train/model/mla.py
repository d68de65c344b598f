"""Multi-head latent attention (DeepSeek-V2 / V3, arXiv 2405.04434), with Hugging Face's parameter names.

    q      = q_proj(x)                                    (q_lora_rank None)
           | q_b_proj(q_a_layernorm(q_a_proj(x)))         (a low-rank query)
    q      -> per head [q_nope (qk_nope_head_dim) ; q_rot (qk_rope_head_dim)]
    c, k_r = kv_a_proj_with_mqa(x) split [kv_lora_rank ; qk_rope_head_dim]     (k_r: ONE rotary key for all heads)
    k_nope, v = kv_b_proj(kv_a_layernorm(c)) per head split [qk_nope_head_dim ; v_head_dim]
    k      = [k_nope ; RoPE(k_r)],  q = [q_nope ; RoPE(q_rot)]
    o      = o_proj(softmax(q k^T * scale + causal) v)    scale: rope.mla_softmax_scale (yarn mscale^2)

RoPE on interleaved pairs (rope_interleave, DeepSeek's layout): the rotary dims are split into their even and odd
entries, which is then the rotate-half layout; q and k are permuted alike, so q.k is that of rotating the pairs in
place (transformers' DeepSeek-V2 complex rotation, V3's apply_rotary_pos_emb_interleave). The two latent norms use
eps 1e-6 whatever rms_norm_eps is, as transformers builds them. attention_bias puts a bias on q_a_proj,
kv_a_proj_with_mqa and o_proj (transformers' DeepSeek layout; q_proj, q_b_proj and kv_b_proj never have one).
Shape legend: B batch, S sequence, D hidden, H heads, C kv_lora_rank, Q q_lora_rank, Dn / Dr / Dv the nope, rope
and value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import ModelConfig
from moe_train.model.norm import RMSNorm
from moe_train.model.rope import apply_rope, mla_softmax_scale

LATENT_NORM_EPS = 1e-6  # DeepseekV2/V3RMSNorm(q_lora_rank / kv_lora_rank) keep their default eps


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]: interleaved pairs to rotate-half layout."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLAttention(nn.Module):
    """DeepSeek MLA from a ModelConfig (q_lora_rank, kv_lora_rank, qk_nope/qk_rope/v head dims, rope_interleave)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

        D, H = cfg.hidden_size, cfg.num_heads
        self.num_heads, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.resolved_rope_interleave
        self.scale = mla_softmax_scale(cfg)
        qk = self.nope + self.rope
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        # LongCat-Flash scales the query by sqrt(D / q_lora_rank) and the normalised kv latent by sqrt(D / kv_lora_rank)
        # (transformers' LongcatFlashMLA mla_scale_q_lora / mla_scale_kv_lora); DeepSeek does not.
        longcat = cfg.family == "longcat_flash"
        self.q_scale = (D / cfg.q_lora_rank) ** 0.5 if longcat else 1.0
        self.kv_scale = (D / cfg.kv_lora_rank) ** 0.5 if longcat else 1.0

    def _query(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, Dn, Dr, Dv = self.num_heads, self.nope, self.rope, self.v_dim
        q_heads = self._query(x_BSD).view(B, S, H, Dn + Dr).transpose(1, 2)
        if self.q_scale != 1.0:
            q_heads = q_heads * self.q_scale
        q_nope, q_rot = q_heads.split([Dn, Dr], dim=-1)
        c_BSC, k_rot_BSDr = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, Dr], dim=-1)
        c_BSC = self.kv_a_layernorm(c_BSC)
        if self.kv_scale != 1.0:
            c_BSC = c_BSC * self.kv_scale
        kv_heads = self.kv_b_proj(c_BSC).view(B, S, H, Dn + Dv).transpose(1, 2)
        k_nope, v_BHSDv = kv_heads.split([Dn, Dv], dim=-1)
        k_rot_B1SDr = self._rope(k_rot_BSDr[:, None], cos, sin)
        q = torch.cat([q_nope, self._rope(q_rot, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rot_B1SDr.expand(B, H, S, Dr)], dim=-1)
        o_BHSDv = F.scaled_dot_product_attention(q, k, v_BHSDv, is_causal=True, scale=self.scale)
        return self.o_proj(o_BHSDv.transpose(1, 2).reshape(B, S, H * Dv))
