"""config.json <-> ModelConfig for Mixtral / Qwen2-MoE / Qwen3-MoE Hugging Face folders (DeepSeek-V2 / V3:
io/hf_deepseek.py; LongCat-Flash: io/hf_longcat.py).

config_from_hf resolves fields the way transformers does (its class defaults where config.json leaves a field out)
and refuses, by name, every setting moe_train cannot reproduce (sliding windows in use, scaled RoPE, dense layers,
router jitter). The full MoEConfig of a moe_train model travels under the "moe_train" key, so null-expert and Ada-K
routers come back exactly. `num_experts_per_tok` is what transformers routes with: top_k for top-k and Ada-K
models (Ada-K's base model is the frozen top-k model), the FLOPs-baseline k for null-expert models (transformers
ignores the null gate, so it loads the top-k model the conversion started from).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from moe_train.config import FAMILIES, ConfigError, ModelConfig, MoEConfig, validate_model
from moe_train.io import hf_longcat, hf_remote
from moe_train.io.hf_common import (
    CONFIG_NAME,
    MOE_TRAIN_KEY,
    check_hf_field_types,
    parse_moe_extra,
    refuse_quantized,
    rope_theta,
)
from moe_train.io.hf_deepseek import (
    DEEPSEEK_ARCHITECTURES,
    DEEPSEEK_DEFAULTS,
    DEEPSEEK_FAMILIES,
    deepseek_config_from_hf,
    deepseek_config_to_hf,
)
from moe_train.routing.registry import router_class

MODEL_TYPES = FAMILIES  # a family is named by its Hugging Face model_type (config.FAMILIES is the one list)
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", **DEEPSEEK_ARCHITECTURES,
                 hf_longcat.FAMILY: hf_longcat.ARCHITECTURE}

# transformers 5.23 class defaults, used where config.json leaves a field out (what transformers itself would do).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, initializer_range=0.02, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, sliding_window=None, num_experts_per_tok=2, num_local_experts=8,
                    router_jitter_noise=0.0, rope_theta=1e6),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=None, hidden_act="silu",
                      max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28, decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                      norm_topk_prob=False, mlp_only_layers=[], qkv_bias=True, rope_theta=10000.0),
    # Qwen3MoeConfig: no shared expert; attention_bias covers q/k/v/o; q/k RMSNorm per head (always present)
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=None, hidden_act="silu",
                      max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
                      norm_topk_prob=False, mlp_only_layers=[], attention_bias=False, rope_theta=10000.0),
    **DEEPSEEK_DEFAULTS,  # io/hf_deepseek.py maps the DeepSeek families
    hf_longcat.FAMILY: hf_longcat.DEFAULTS,  # io/hf_longcat.py maps LongCat-Flash
}


def _get(hf: dict, key: str, family: str) -> Any:
    value = hf.get(key)
    return HF_DEFAULTS[family].get(key) if value is None and key not in hf else value


def _rope_theta(hf: dict, family: str, where: str) -> float:
    return rope_theta(hf, HF_DEFAULTS[family]["rope_theta"], where)


def _check_sliding_window(hf: dict, family: str, max_pos: int, where: str) -> None:
    """Sliding-window attention changes the math only when the window is shorter than the longest sequence."""
    window = _get(hf, "sliding_window", family)
    if family == "qwen2_moe":
        if not _get(hf, "use_sliding_window", family):
            return
        layer_types = hf.get("layer_types")
        if layer_types is None:  # transformers' own rule for which layers slide
            layer_types = ["sliding_attention" if (i + 1) % 2 and i < _get(hf, "max_window_layers", family)
                           else "full_attention" for i in range(_get(hf, "num_hidden_layers", family))]
        if "sliding_attention" not in layer_types:
            return
    if family == "qwen3_moe" and not _get(hf, "use_sliding_window", family):
        return  # transformers sets sliding_window to None then (every layer uses the same window when on)
    if window is not None and 0 < window < max_pos:
        raise ValueError(f"{where}: sliding_window={window} (< max_position_embeddings={max_pos}) is in use; "
                         f"moe_train implements full causal attention only. Set sliding_window to null "
                         f"(use_sliding_window: false for Qwen2-MoE) if full attention is what you want")


def config_from_hf(hf: dict, where: str = CONFIG_NAME) -> ModelConfig:
    """Maps a Mixtral / Qwen2-MoE config.json to a validated ModelConfig (ValueError naming unsupported fields)."""
    family = hf.get("model_type")
    if family == hf_remote.REMOTE_MODEL_TYPE:  # an export carrying its own modeling code: the family's fields
        family = hf.get(hf_remote.FAMILY_KEY)
        if family not in hf_remote.FAMILIES:
            raise ValueError(f"{where}: model_type={hf_remote.REMOTE_MODEL_TYPE!r} with {hf_remote.FAMILY_KEY}="
                             f"{family!r}; expected one of {hf_remote.FAMILIES}")
        hf = {**hf, "model_type": family}
    if family not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={family!r} is not supported; supported: {MODEL_TYPES}")
    check_hf_field_types(hf, where)  # every family's fields, before any is compared or used
    refuse_quantized(hf, where)
    if family in DEEPSEEK_FAMILIES:
        return _finish_config(deepseek_config_from_hf(hf, where), hf, where)
    if family == hf_longcat.FAMILY:  # its own layer layout, zero experts and extra checks
        return hf_longcat.config_from_hf(hf, where)
    act = _get(hf, "hidden_act", family)
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (experts are SwiGLU with 'silu')")
    max_pos = _get(hf, "max_position_embeddings", family)
    _check_sliding_window(hf, family, max_pos, where)
    num_layers = _get(hf, "num_hidden_layers", family)
    if family == "mixtral":
        jitter = _get(hf, "router_jitter_noise", family)
        if jitter:
            raise ValueError(f"{where}: router_jitter_noise={jitter} is not supported (moe_train routers add no "
                             f"jitter); set it to 0")
        num_experts, ffn = _get(hf, "num_local_experts", family), _get(hf, "intermediate_size", family)
        shared, bias, norm_topk = 0, False, True  # Mixtral always renormalises its top-k gates
    else:
        step = _get(hf, "decoder_sparse_step", family)
        dense = sorted(set(_get(hf, "mlp_only_layers", family) or []))
        if step != 1:  # layer i is sparse iff (i + 1) % step == 0: with step != 1, layer 0 is dense
            raise ValueError(f"{where}: decoder_sparse_step={step} leaves dense MLP layers; moe_train needs every "
                             f"layer to be an MoE layer (decoder_sparse_step: 1)")
        if dense:
            raise ValueError(f"{where}: mlp_only_layers={dense} are dense MLP layers; moe_train needs every layer "
                             f"to be an MoE layer (mlp_only_layers: [])")
        num_experts, ffn = _get(hf, "num_experts", family), _get(hf, "moe_intermediate_size", family)
        if family == "qwen3_moe":  # no shared expert; one attention_bias for q/k/v/o
            # published configs say num_experts; transformers 5 saves its attribute num_local_experts
            num_experts = hf["num_local_experts"] if "num_experts" not in hf and "num_local_experts" in hf \
                else num_experts
            shared, bias = 0, _get(hf, "attention_bias", family)
        else:
            shared, bias = _get(hf, "shared_expert_intermediate_size", family), _get(hf, "qkv_bias", family)
        norm_topk = _get(hf, "norm_topk_prob", family)
    if not num_experts or num_experts < 1:
        raise ValueError(f"{where}: {num_experts!r} experts; moe_train needs an MoE model with >= 1 expert per layer")
    heads = _get(hf, "num_attention_heads", family)
    kv_heads = _get(hf, "num_key_value_heads", family)
    kv_heads = heads if kv_heads is None else kv_heads  # null means multi-head attention, as in transformers
    moe = MoEConfig(router="topk", num_experts=num_experts, top_k=_get(hf, "num_experts_per_tok", family),
                    norm_topk_prob=bool(norm_topk))
    cfg = ModelConfig(
        family=family, vocab_size=_get(hf, "vocab_size", family), hidden_size=_get(hf, "hidden_size", family),
        intermediate_size=ffn, num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim"), rope_theta=_rope_theta(hf, family, where),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", family)), max_seq_len=max_pos,
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", family)), attention_bias=bool(bias),
        shared_expert_intermediate_size=shared, init_std=float(_get(hf, "initializer_range", family)), moe=moe)
    return _finish_config(cfg, hf, where)


def _finish_config(cfg: ModelConfig, hf: dict, where: str) -> ModelConfig:
    """The moe_train extra (the exact router), then the one validation."""
    if MOE_TRAIN_KEY in hf:
        cfg.moe = _moe_from_extra(hf[MOE_TRAIN_KEY], cfg.moe, hf, where)
    try:
        validate_model(cfg)
    except ConfigError as e:
        raise ValueError(f"{where} describes a model moe_train cannot build: {e}") from None
    return cfg


def _hf_top_k(moe: MoEConfig) -> int:
    """The k transformers routes with (see the module docstring)."""
    return router_class(moe.router).hf_top_k(moe)


def _moe_from_extra(extra: Any, from_hf_fields: MoEConfig, hf: dict, where: str) -> MoEConfig:
    moe = parse_moe_extra(extra, where)
    k_key = "num_experts_per_tok"
    for ours, theirs, hf_key in ((moe.num_experts, from_hf_fields.num_experts, "the expert count"),
                                 (moe.norm_topk_prob, from_hf_fields.norm_topk_prob, "norm_topk_prob"),
                                 (moe.score_func, from_hf_fields.score_func, "the score function"),
                                 (moe.routed_scaling_factor, from_hf_fields.routed_scaling_factor,
                                  "routed_scaling_factor"),
                                 (_hf_top_k(moe), from_hf_fields.top_k, k_key)):
        if ours != theirs:
            raise ValueError(f"{where}: {hf_key}={theirs!r} disagrees with the '{MOE_TRAIN_KEY}' section (which "
                             f"implies {ours!r}); edit both consistently, or delete '{MOE_TRAIN_KEY}' to import a "
                             f"plain top-k model")
    return moe


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json transformers needs to rebuild the model, plus our MoEConfig under "moe_train"."""
    moe = cfg.moe
    family = cfg.family
    if family not in MODEL_TYPES:
        raise ValueError(f"model.family={family!r} cannot be exported; supported: {MODEL_TYPES}")
    if family == hf_longcat.FAMILY:  # num_layers, not num_hidden_layers (= 2 x num_layers there)
        return hf_longcat.config_to_hf(cfg, str(dtype).removeprefix("torch."))
    if family == "mixtral":
        for bad, why in ((cfg.attention_bias, "attention_bias=True (q/k/v biases)"),
                         (cfg.shared_expert_intermediate_size > 0, "a shared expert"),
                         (not moe.norm_topk_prob, "norm_topk_prob=False")):
            if bad:
                raise ValueError(f"a Mixtral checkpoint cannot express {why}; set model.family: qwen2_moe to "
                                 f"export this model as Qwen2-MoE")
    dtype_name = str(dtype).removeprefix("torch.")
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads the top-level rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "num_experts_per_tok": _hf_top_k(moe),
        "output_router_logits": False,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the transformers 4.x name of "dtype"
    }
    if cfg.head_dim is not None:
        hf["head_dim"] = cfg.head_dim
    if family in DEEPSEEK_FAMILIES:
        hf.update(deepseek_config_to_hf(cfg))
    elif family == "mixtral":
        hf.update(intermediate_size=cfg.intermediate_size, num_local_experts=moe.num_experts,
                  router_jitter_noise=0.0)
    elif family == "qwen3_moe":
        if cfg.shared_expert_intermediate_size:
            raise ValueError("a Qwen3-MoE checkpoint cannot express a shared expert; set model.family: qwen2_moe "
                             "to export this model as Qwen2-MoE")
        hf.update(intermediate_size=cfg.intermediate_size,  # dense-MLP width: unused, every layer is MoE
                  moe_intermediate_size=cfg.intermediate_size, num_experts=moe.num_experts,
                  norm_topk_prob=moe.norm_topk_prob, attention_bias=cfg.attention_bias, decoder_sparse_step=1,
                  mlp_only_layers=[], use_sliding_window=False)
    else:
        hf.update(intermediate_size=cfg.intermediate_size,  # dense-MLP width: unused, every layer is MoE
                  moe_intermediate_size=cfg.intermediate_size, num_experts=moe.num_experts,
                  shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                  norm_topk_prob=moe.norm_topk_prob, qkv_bias=cfg.attention_bias, decoder_sparse_step=1,
                  mlp_only_layers=[], use_sliding_window=False, layer_types=["full_attention"] * cfg.num_layers)
    hf[MOE_TRAIN_KEY] = dataclasses.asdict(moe)
    return hf


# ----------------------------------------------------------------------------------------------------------


def write_hf_config(folder: Path, hf: dict) -> None:
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
