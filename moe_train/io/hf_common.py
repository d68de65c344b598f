"""What every family's config.json reader shares: the file's name and parsing, the "moe_train" section that carries
our full MoEConfig, and RoPE's base as transformers resolves it (io/hf_config.py, io/hf_deepseek.py and
io/hf_longcat.py all call these; hf_config.py dispatches to the other two, so they live below it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

from moe_train.config import ConfigError, MoEConfig, from_dict, validate_moe

CONFIG_NAME = "config.json"
MOE_TRAIN_KEY = "moe_train"

# The type of every config.json field a family's reader uses (io/hf_config.py, io/hf_deepseek.py, io/hf_longcat.py):
# a field of another type would reach ModelConfig as is ("32" for hidden_size: a TypeError deep in the model, or a
# comparison that misleads: num_key_value_heads=4 "differs from" num_attention_heads="4"). A trailing "?" allows
# null, which these fields mean as "not set" in transformers' configs.
HF_FIELD_TYPES: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_layers",
                     "num_attention_heads", "max_position_embeddings", "num_local_experts", "num_experts",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                     "max_window_layers", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "first_k_dense_replace", "n_routed_experts", "moe_layer_freq", "num_nextn_predict_layers",
                     "num_mtp_layers", "ffn_hidden_size", "expert_ffn_hidden_size", "moe_topk"), "int"),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "sliding_window", "q_lora_rank", "n_group", "topk_group",
                     "qk_head_dim", "zero_expert_num", "num_experts_per_tok", "n_shared_experts"), "int?"),
    **dict.fromkeys(("rms_norm_eps", "initializer_range", "routed_scaling_factor", "router_jitter_noise"), "float"),
    **dict.fromkeys(("rope_theta", "partial_rotary_factor"), "float?"),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "qkv_bias", "norm_topk_prob", "use_sliding_window",
                     "mlp_bias", "rope_interleave", "router_bias"), "bool"),
    **dict.fromkeys(("model_type", "hidden_act", "topk_method", "scoring_func", "zero_expert_type"), "str"),
    **dict.fromkeys(("rope_scaling", "rope_parameters", "quantization_config", MOE_TRAIN_KEY), "map?"),
    "mlp_only_layers": "int list?", "layer_types": "str list?",
}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "map": "a JSON object", "int list": "a list of integers", "str list": "a list of strings"}


def _has_type(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "map":
        return isinstance(value, dict)
    item = kind.removesuffix(" list")
    return isinstance(value, list) and all(_has_type(v, item) for v in value)


def check_hf_field_types(hf: dict, where: str) -> None:
    """Every field in HF_FIELD_TYPES that config.json sets has its type (ValueError naming the key and file)."""
    for key, kind in HF_FIELD_TYPES.items():
        if key not in hf:
            continue
        value, nullable = hf[key], kind.endswith("?")
        if value is None and nullable:
            continue
        if not _has_type(value, kind.rstrip("?")):
            raise ValueError(f"{where}: {key}={value!r} must be {_TYPE_WORDS[kind.rstrip('?')]}"
                             f"{' or null' if nullable else ''} (got {type(value).__name__})")


def refuse_quantized(hf: dict, where: str) -> None:
    """A quantized checkpoint (FP8 block-scaled, GPTQ, AWQ, bitsandbytes...) is refused for every family: its
    weights are not the model's weights until dequantized, which moe_train does not do."""
    for key in ("quantization_config", "compression_config"):
        if hf.get(key):
            method = hf[key].get("quant_method", "?") if isinstance(hf[key], dict) else "?"
            raise ValueError(f"{where}: {key} (quant_method {method!r}): quantized checkpoints (FP8, int8, int4) are "
                             f"not supported; dequantize it to bf16 / fp32 first (e.g. load it in transformers and "
                             f"save_pretrained with the quantization removed)")


def read_hf_config(path: Union[str, Path]) -> dict:
    """The parsed config.json of a Hugging Face folder (ValueError if the folder or file is missing)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"Hugging Face checkpoint folder {str(folder)!r} does not exist or is not a directory")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"{str(folder)!r} has no {CONFIG_NAME}; a Hugging Face model folder needs one")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object at the top level")
    return hf


def rope_theta(hf: dict, default_theta: float, where: str) -> float:
    """RoPE base as transformers resolves it: rope_scaling or rope_parameters dict, then top-level rope_theta, then
    the family's class default."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters={params!r} must be a mapping")
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:  # one dict per layer type: fine only when every layer type uses the same RoPE
        if any(v != nested[0] for v in nested) or len(nested) != len(params):
            raise ValueError(f"{where}: rope_parameters differ per layer type ({params!r}); moe_train uses one "
                             f"RoPE for every layer")
        params = nested[0]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: rope_type={rope_type!r} is not supported; only plain RoPE ('default') is "
                         f"implemented (no scaled / yarn / llama3 variants)")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor is not None and factor != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={factor!r} is not supported (only 1.0: every head dim "
                         f"rotates)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is not None and not _has_type(theta, "float"):
        raise ValueError(f"{where}: rope_theta={theta!r} must be a number")
    return float(default_theta if theta is None else theta)


def parse_moe_extra(extra: Any, where: str) -> MoEConfig:
    """Our saved MoEConfig (router state, budget, losses) from config.json's "moe_train" section, validated; every
    family's reader then checks it against the fields transformers routes with."""
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: '{MOE_TRAIN_KEY}' must be a mapping of MoEConfig fields, got {extra!r}")
    try:
        moe = from_dict(MoEConfig, extra, f"{where}:{MOE_TRAIN_KEY}")
        validate_moe(moe, f"{where}:{MOE_TRAIN_KEY}")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return moe
