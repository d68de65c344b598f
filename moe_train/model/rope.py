"""RoPE frequency tables: plain and yarn (model.rope_scaling), as transformers computes them.

    default  inv_freq_i = theta^(-2i/d),  i = 0 .. d/2 - 1,   cos/sin unscaled
    yarn     (transformers' _compute_yarn_parameters; arXiv 2309.00071)
             extrapolated e_i = theta^(-2i/d), interpolated e_i / factor; a linear ramp over the dims between
             low = floor(dim(beta_fast)) and high = ceil(dim(beta_slow)), dim(r) = d ln(L0 / (2 pi r)) / (2 ln theta),
             L0 = original_max_position_embeddings (no floor / ceil when truncate is false), blends them:
             inv_freq_i = interp_i (1 - w_i) + extrap_i w_i,  w_i = 1 - clamp((i - low) / (high - low), 0, 1)
             cos/sin times attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both
             are set, else mscale(factor);  mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, else 1
    MLA softmax scale (DeepSeek): (qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn
    when mscale_all_dim is set (transformers' yarn_apply_mscale).

d is the rotated width (ModelConfig.rope_dim: the whole head, or qk_rope_head_dim under MLA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from moe_train.config import ModelConfig, RopeScalingConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_inv_freq(dim: int, theta: float, r: RopeScalingConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) of yarn, step for step as transformers computes them (fp32)."""
    factor, L0 = r.factor, r.original_max_position_embeddings
    if r.attention_factor is not None:
        attention_factor = r.attention_factor
    elif r.mscale and r.mscale_all_dim:
        attention_factor = float(yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(L0 / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(r.beta_fast or 32), correction_dim(r.beta_slow or 1)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_w = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_w) + (1.0 / pos_freqs) * extrapolation_w
    return inv_freq, attention_factor


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor) for the model's rotated width and rope_scaling."""
    dim = cfg.rope_dim
    if cfg.rope_scaling.type == "yarn":
        return yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_scaling)
    return default_inv_freq(dim, cfg.rope_theta), 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """The attention softmax scale of DeepSeek MLA (module docstring)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    r = cfg.rope_scaling
    if r.type != "default" and r.mscale_all_dim:
        m = yarn_mscale(r.factor, r.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """cos / sin tables; ``inv_freq`` and ``attention_factor`` (cos / sin scale) come from rope_tables for scaled
    RoPE (yarn), else plain RoPE of ``head_dim`` with base ``theta``."""

    def __init__(self, head_dim: int, theta: float, inv_freq: Optional[torch.Tensor] = None,
                 attention_factor: float = 1.0):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.attention_factor = attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_SH = positions_S.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs_SH, freqs_SH], dim=-1)
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()


def rotary_for(cfg: ModelConfig) -> RotaryEmbedding:
    """The model's RoPE: its rotated width (cfg.rope_dim) and rope_scaling (model/rope.py)."""
    inv_freq, attention_factor = rope_tables(cfg)
    return RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, inv_freq, attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    return (x_BHSHd * cos_SHd + _rotate_half(x_BHSHd) * sin_SHd).to(x_BHSHd.dtype)
