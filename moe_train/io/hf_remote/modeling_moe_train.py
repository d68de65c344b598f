"""A moe_train model in plain torch, for transformers' trust_remote_code: what an export runs when its router is one
transformers does not have (AdaMoE null experts of kind zero / identity / constant, Ada-K allocators, top-p routing,
a top-k router with a selection bias the family's transformers model ignores).

Self-contained on purpose: it imports torch and transformers only, never moe_train (the user of an export does not
have it). It is a line-for-line port of moe_train's decoder (model/decoder.py, mla.py, rope.py, moe_layer.py) and
routers (routing/topk.py, null_experts.py, adak.py, top_p.py, scores.py, zero_compute.py) at inference:
    tokens -> embed -> L x [ x + Attn(RMSNorm(x)) ; x + MoE(RMSNorm(x)) (or a dense MLP) ] -> RMSNorm -> lm_head
Module names are the family's Hugging Face names, so the folder's safetensors (which moe_train's from_hf also reads)
load as they are. Ada-K runs greedy (k = k_min + argmax of the allocator), its inference mode.
Not reproduced: training-time expert capacity drops (model.moe.capacity_factor), which depend on the batch.
generate() recomputes the whole sequence at every step (no KV cache): correct for any router, slow for long outputs.
Shape legend: B batch, S sequence, D hidden, H heads, G kv heads, Hd head dim, T = B*S tokens, E true experts,
Z null experts, N = E + Z, K slots per token, A Ada-K actions.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moe_train import MoeTrainConfig

LATENT_NORM_EPS = 1e-6  # DeepSeek's q / kv latent RMSNorms keep their default eps
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # (gate, up, down); every other family: gate_proj / up_proj / down_proj
MOE_BLOCK_NAME = {"mixtral": "block_sparse_moe"}  # every other family: mlp


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def linear(i, o):
    """A bias-free Linear; a zero-wide one (Qwen2-MoE without a shared expert) without torch's init warning."""
    if i and o:
        return nn.Linear(i, o, bias=False)
    lin = nn.Linear(1, 1, bias=False)
    lin.weight, lin.in_features, lin.out_features = nn.Parameter(torch.empty(o, i)), i, o
    return lin


class SwiGLU(nn.Module):
    def __init__(self, hidden_size, ffn_size, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, ((hidden_size, ffn_size), (hidden_size, ffn_size), (ffn_size, hidden_size))):
            setattr(self, name, linear(i, o))

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSHd, cos, sin):
    return (x_BHSHd * cos + rotate_half(x_BHSHd) * sin).to(x_BHSHd.dtype)


def deinterleave(x):
    """Interleaved pairs to the rotate-half layout (DeepSeek's RoPE)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def rope_tables(m, position_ids_BS):
    """cos / sin [B, 1, S, d]: the exported inverse frequencies (plain or yarn) and attention factor."""
    inv_freq = torch.tensor(m["rope_inv_freq"], dtype=torch.float32, device=position_ids_BS.device)
    freqs = position_ids_BS.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if m["rope_attention_factor"] != 1.0:
        cos, sin = cos * m["rope_attention_factor"], sin * m["rope_attention_factor"]
    return cos[:, None], sin[:, None]


def attend(q, k, v, mask, scale=None, enable_gqa=False):
    """Causal attention; ``mask`` [B, 1, S, S] (True = attend) only where padding needs one."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen2-MoE; Qwen3-MoE adds q / k RMSNorm per head and an o bias)."""

    def __init__(self, m):
        super().__init__()
        D, Hd = m["hidden_size"], m["head_dim"]
        self.num_heads, self.num_kv_heads, self.head_dim = m["num_heads"], m["num_kv_heads"], Hd
        bias, qwen3 = m["attention_bias"], m["family"] == "qwen3_moe"
        self.q_proj = nn.Linear(D, self.num_heads * Hd, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * Hd, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * Hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * Hd, D, bias=bias and qwen3)
        self.q_norm = RMSNorm(Hd, m["rms_norm_eps"]) if qwen3 else None
        self.k_norm = RMSNorm(Hd, m["rms_norm_eps"]) if qwen3 else None

    def forward(self, x, cos, sin, mask):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention."""

    def __init__(self, m):
        super().__init__()
        D, H, a = m["hidden_size"], m["num_heads"], m["mla"]
        self.num_heads, self.kv_lora_rank = H, a["kv_lora_rank"]
        self.nope, self.rope, self.v_dim = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        self.interleave, self.scale = m["rope_interleave"], a["softmax_scale"]
        qk, bias = self.nope + self.rope, m["attention_bias"]
        if a["q_lora_rank"] is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, a["q_lora_rank"], bias=bias)
            self.q_a_layernorm = RMSNorm(a["q_lora_rank"], LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(a["q_lora_rank"], H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    def _rope(self, x, cos, sin):
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def forward(self, x, cos, sin, mask):
        B, S, _ = x.shape
        H, Dn, Dr, Dv = self.num_heads, self.nope, self.rope, self.v_dim
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, S, H, Dn + Dr).transpose(1, 2).split([Dn, Dr], dim=-1)
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, Dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, S, H, Dn + Dv).transpose(1, 2)
        k_nope, v = kv.split([Dn, Dv], dim=-1)
        k_rot = self._rope(k_rot[:, None], cos, sin)
        q = torch.cat([q_nope, self._rope(q_rot, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, H, S, Dr)], dim=-1)
        o = attend(q, k, v, mask, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * Dv))


# ----------------------------------------------------------------------------------------------------------
# routing (moe_train's routers at inference; the same fp32 scores, stable tie order and gate rules)
ROUTER_ALIASES = {"null": "null_experts"}  # old router names in config.json -> the router they name


def select_topk(scores_TN, k, bias=None, tie_break="true_first"):
    """The k best by scores + bias (exact ties: lower index first), and their unbiased scores."""
    choice = scores_TN if bias is None else scores_TN + bias
    if tie_break == "true_first":
        idx = torch.sort(choice, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        idx = torch.topk(choice, k, dim=-1).indices
    return scores_TN.gather(-1, idx), idx


def renormalize(w_TK, keep_TK):
    w = w_TK * keep_TK
    denom = w.sum(dim=-1, keepdim=True)
    return w / torch.where(denom > 0, denom, torch.ones_like(denom))


def selection_bias(scores_TN, num_true, bias_N, method, n_group, topk_group):
    """bias_N plus -inf on experts outside each token's best groups (DeepSeek); null experts follow their twin's
    group (null j <-> true j mod E)."""
    if method == "greedy" or topk_group >= n_group:
        return bias_N
    E, N = num_true, scores_TN.shape[-1]
    choice = scores_TN if bias_N is None else scores_TN + bias_N
    T = choice.shape[0]
    grouped = choice[:, :E].reshape(T, n_group, E // n_group)
    if method == "group_limited_greedy":
        g = grouped.max(dim=-1).values
    else:  # noaux_tc
        g = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.sort(g, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep_TE = torch.zeros_like(g, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(E // n_group, dim=1)
    keep_TN = torch.cat([keep_TE, keep_TE[:, torch.arange(N - E, device=keep_TE.device) % E]], dim=1)
    mask = torch.zeros_like(choice).masked_fill(~keep_TN, float("-inf"))
    return mask if bias_N is None else mask + bias_N


def split_null_slots(w_TK, idx_TK, E, kind, norm):
    """(true idx (-1 on null / unused slots), true weights, null idx, null weights) under the null kind's gate rule:
    zero renormalises over the true picks only; identity / constant picks are real gates (all picks normalised)."""
    true = idx_TK < E
    expert_idx = torch.where(true, idx_TK, torch.full_like(idx_TK, -1))
    if kind == "zero":
        return expert_idx, (renormalize(w_TK, true) if norm else w_TK * true), None, None
    if norm:
        w_TK = renormalize(w_TK, torch.ones_like(true))
    null_idx = torch.where(true, torch.full_like(idx_TK, -1), idx_TK - E)
    return expert_idx, w_TK * true, null_idx, w_TK * ~true


class MoEBlock(nn.Module):
    """Router + per-expert SwiGLUs (+ Qwen2-MoE's gated shared expert, DeepSeek's shared experts), with the router's
    tensors directly under the block, as the export stores them."""

    def __init__(self, m, c):
        super().__init__()
        family, D, E, Z = m["family"], m["hidden_size"], c["num_experts"], c["num_null_experts"]
        self.m, self.c, self.family = m, c, family
        # moe_train's router name; "null" is the null-expert router's name before "null_experts" (older exports)
        self.router, self.E = ROUTER_ALIASES.get(c["router"], c["router"]), E
        self.k_max = m["k_max"]  # Ada-K's and top-p's slots per token (resolved at export)
        self.Z = Z if self.router in ("null_experts", "adak") else 0
        self.gate = nn.Linear(D, E, bias=False)
        if self.Z:
            self.null_gate = nn.Linear(D, self.Z, bias=False)
        if self.router == "adak":
            self.allocator = nn.Linear(D, self.k_max - c["k_min"] + 1, bias=False)
        if self.Z and c["null_kind"] == "constant":
            self.null_values = nn.Parameter(torch.zeros(self.Z, D))
        # selection-only biases: DeepSeek-V3 keeps its correction bias on the gate (always stored for V3)
        has_bias = (c["use_expert_bias"] or (c["expert_bias_rate"] > 0 and self.router in ("topk", "null_experts"))) \
            and self.router != "top_p"
        if family == "deepseek_v3":
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))
        elif has_bias:
            self.register_buffer("expert_bias", torch.zeros(E))
        if self.Z and c["use_expert_bias"]:
            self.register_buffer("null_expert_bias", torch.zeros(self.Z))
        if self.router == "null_experts" and c["target_true_experts"] is not None:
            self.register_buffer("null_bias", torch.zeros(()))
            self.register_buffer("null_bias_integral", torch.zeros(()))
        names = EXPERT_NAMES.get(family, ("gate_proj", "up_proj", "down_proj"))
        self.experts = nn.ModuleList(SwiGLU(D, m["intermediate_size"], names) for _ in range(E))
        if family == "qwen2_moe":  # transformers' Qwen2-MoE always has one (zero-width: it adds exactly 0)
            self.shared_expert = SwiGLU(D, m["shared_expert_intermediate_size"])
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)
        if m["n_shared_experts"]:
            self.shared_experts = SwiGLU(D, m["intermediate_size"] * m["n_shared_experts"])

    def _expert_bias(self):
        if self.family == "deepseek_v3":
            return self.gate.e_score_correction_bias
        return getattr(self, "expert_bias", None)

    def route(self, x_TD):
        """(expert_idx_TK, weight_TK, null_idx_TK, null_weight_TK): moe_train's router of this layer at inference."""
        c, E, Z = self.c, self.E, self.Z
        if self.router == "top_p":
            probs = torch.softmax(self.gate(x_TD).float(), dim=-1)
            w, idx = select_topk(probs, self.k_max)
            keep = (w.cumsum(dim=-1) - w) < c["top_p"]  # the mass before a slot is below p
            # the published raw probabilities unless the run renormalised (top_p_renormalize), then the family's
            # routed_scaling_factor, as moe_train's TopPRouter
            w = renormalize(w, keep) if c.get("top_p_renormalize", False) else w * keep
            w = w * c.get("routed_scaling_factor", 1.0)
            return torch.where(keep, idx, torch.full_like(idx, -1)), w, None, None
        weight = self.gate.weight if not Z else torch.cat([self.gate.weight, self.null_gate.weight])
        logits = F.linear(x_TD, weight)
        z = logits.float()
        scores = torch.softmax(z, dim=-1) if c["score_func"] == "softmax" else torch.sigmoid(z)
        expert_bias = self._expert_bias()
        bias_N = expert_bias
        if self.router == "null_experts" and (expert_bias is not None or hasattr(self, "null_bias")):
            true_b = expert_bias if expert_bias is not None else logits.new_zeros(E, dtype=torch.float32)
            null_b = getattr(self, "null_bias", true_b.new_zeros(())).expand(Z)
            if hasattr(self, "null_expert_bias"):
                null_b = null_b + self.null_expert_bias
            bias_N = torch.cat([true_b, null_b])
        elif self.router == "adak" and Z and expert_bias is not None:
            null_b = getattr(self, "null_expert_bias", expert_bias.new_zeros(Z))
            bias_N = torch.cat([expert_bias, null_b])
        bias = selection_bias(scores, E, bias_N, c["topk_method"], c["n_group"], c["topk_group"])
        tie_break = c["null_tie_break"] if Z else "true_first"
        K = self.k_max if self.router == "adak" else c["top_k"]
        w, idx = select_topk(scores, K, bias, tie_break)
        null_idx = null_w = None
        if self.router == "adak":
            log_pi = torch.log_softmax(F.linear(x_TD.float(), self.allocator.weight.float()), dim=-1)
            keep = torch.arange(K, device=x_TD.device) < (c["k_min"] + log_pi.argmax(dim=-1))[:, None]
            if Z:
                idx, w, null_idx, null_w = split_null_slots(w * keep, torch.where(keep, idx, -1), E, c["null_kind"],
                                                            c["norm_topk_prob"])
            else:
                w = renormalize(w, keep) if c["norm_topk_prob"] else w * keep
                idx = torch.where(keep, idx, torch.full_like(idx, -1))
        elif self.router == "null_experts":
            idx, w, null_idx, null_w = split_null_slots(w, idx, E, c["null_kind"], c["norm_topk_prob"])
        elif c["norm_topk_prob"]:
            w = renormalize(w, torch.ones_like(w))
        rsf = c["routed_scaling_factor"]
        if rsf != 1.0:
            w = w * rsf
            null_w = None if null_w is None else null_w * rsf
        return idx, w, null_idx, null_w

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        x = x_BSD.reshape(B * S, D)
        idx, w, null_idx, null_w = self.route(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                y.index_add_(0, tok, (expert(x[tok]) * w[tok, slot, None].to(x.dtype)))
        if null_w is not None and self.c["null_kind"] == "identity":
            y = y + x * null_w.sum(dim=-1).to(x.dtype)[:, None]
        elif null_w is not None:  # constant: gate * v_j
            w_TZ = null_w.new_zeros(x.shape[0], self.Z).scatter_add(1, null_idx.clamp(min=0), null_w)
            y = y + (w_TZ.to(self.null_values.dtype) @ self.null_values).to(x.dtype)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y.reshape(B, S, D)


class DecoderLayer(nn.Module):
    def __init__(self, m, c, i):
        super().__init__()
        self.input_layernorm = RMSNorm(m["hidden_size"], m["rms_norm_eps"])
        self.self_attn = MLAttention(m) if m["mla"] else Attention(m)
        self.post_attention_layernorm = RMSNorm(m["hidden_size"], m["rms_norm_eps"])
        if m["moe_layers"][i]:
            self.block_name = MOE_BLOCK_NAME.get(m["family"], "mlp")
            setattr(self, self.block_name, MoEBlock(m, c))
        else:  # DeepSeek's dense-first layers
            self.block_name = "mlp"
            self.mlp = SwiGLU(m["hidden_size"], m["dense_intermediate_size"])

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + getattr(self, self.block_name)(self.post_attention_layernorm(x))


class MoeTrainPreTrainedModel(PreTrainedModel):
    config_class = MoeTrainConfig
    config: MoeTrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        # only tensors a checkpoint lacks are initialised; an export stores every one
        std = self.config.moe_train_model.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.numel():  # Qwen2-MoE: a 0-wide one
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MoeTrainModel(MoeTrainPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        m, c = config.moe_train_model, config.moe_train
        self.embed_tokens = nn.Embedding(m["vocab_size"], m["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(m, c, i) for i in range(m["num_layers"]))
        self.norm = RMSNorm(m["hidden_size"], m["rms_norm_eps"])
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            keys = attention_mask[:, None, None, :S].bool()
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            # a query always sees itself: a padding row would otherwise have no key (NaN); its output is ignored
            mask = (causal & keys) | torch.eye(S, dtype=torch.bool, device=x.device)
            if position_ids is None:  # left padding: positions count the real tokens, as transformers does
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
        if position_ids is None:
            position_ids = torch.arange(S, device=x.device)[None].expand(B, S)
        cos, sin = rope_tables(self.config.moe_train_model, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class MoeTrainForCausalLM(MoeTrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MoeTrainModel(config)
        m = config.moe_train_model
        self.lm_head = nn.Linear(m["hidden_size"], m["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        # no KV cache: every step runs the whole sequence (module docstring)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
