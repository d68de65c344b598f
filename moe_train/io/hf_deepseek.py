"""config.json <-> ModelConfig for DeepSeek-V2 / DeepSeek-V3 Hugging Face folders (transformers' deepseek_v2 / v3).

What each field becomes (transformers 5.24 class defaults where config.json leaves one out):
    moe_intermediate_size -> intermediate_size (routed expert width); intermediate_size -> dense_intermediate_size
    first_k_dense_replace, n_shared_experts, q_lora_rank, kv_lora_rank, qk_nope/qk_rope/v_head_dim: as named
    n_routed_experts -> moe.num_experts; num_experts_per_tok -> moe.top_k; routed_scaling_factor: as named
    DeepSeek-V2: softmax scores, topk_method greedy | group_limited_greedy (n_group / topk_group read only then),
                 never renormalised (transformers' DeepseekV2 ignores norm_topk_prob: a true one is refused),
                 RoPE on interleaved pairs (its complex rotation)
    DeepSeek-V3: sigmoid scores, noaux_tc group-limited routing with n_group / topk_group, norm_topk_prob,
                 e_score_correction_bias -> the router's expert_bias buffer (use_expert_bias), rope_interleave
    rope_scaling / rope_parameters: default or yarn (model.rope_scaling, model/rope.py); other types are refused
Refused by name: hidden_act other than silu, mlp_bias, moe_layer_freq other than 1, scoring_func / topk_method other
than the family's, num_key_value_heads != num_attention_heads (a quantized checkpoint, for every family: hf_common.py).
DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers, stored as layers L, L+1, ...) are not part of
the causal LM transformers builds: their tensors are skipped on import (io/hf_weights.py) and not written on export.
"""

from __future__ import annotations

from typing import Any

from moe_train.config import ModelConfig, MoEConfig, RopeScalingConfig

DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")
DEEPSEEK_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
SCORE_FUNC = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}
FAMILY_TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}

_COMMON = dict(hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
               attention_bias=False, rope_theta=10000.0, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128)
# transformers 5.24 DeepseekV2Config / DeepseekV3Config class defaults
DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(_COMMON, vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                        mlp_bias=False, first_k_dense_replace=0, n_group=None, n_routed_experts=64,
                        n_shared_experts=2, routed_scaling_factor=1.0, topk_group=None, topk_method="greedy",
                        norm_topk_prob=False, num_experts_per_tok=None, moe_intermediate_size=1407),
    "deepseek_v3": dict(_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
                        max_position_embeddings=4096, rope_interleave=True, num_nextn_predict_layers=1),
}
_YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate"}


def _get(hf: dict, key: str, family: str) -> Any:
    return hf[key] if key in hf else DEEPSEEK_DEFAULTS[family].get(key)


def _rope(hf: dict, family: str, max_pos: int, where: str) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, RopeScalingConfig) from rope_parameters (transformers 5) or the legacy rope_scaling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: rope_parameters={params!r} must be a mapping")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", DEEPSEEK_DEFAULTS[family]["rope_theta"]))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"{where}: rope_theta={theta!r} must be a number")
    theta = float(theta)
    if rope_type == "default":
        return theta, RopeScalingConfig()
    if rope_type != "yarn":
        raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported for {family}; moe_train "
                         f"implements 'default' and 'yarn' (model/rope.py)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: rope_parameters.partial_rotary_factor={params['partial_rotary_factor']!r} is "
                         f"not supported with yarn (only 1.0)")
    got = {k: params[k] for k in _YARN_KEYS if params.get(k) is not None}
    original = got.pop("original_max_position_embeddings", max_pos)
    factor = got.pop("factor", None)
    if factor is None:  # transformers: the ratio of the context lengths
        factor = max_pos / original
    return theta, RopeScalingConfig(type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
                                    **{k: (bool(v) if k == "truncate" else float(v)) for k, v in got.items()})


def _refuse(hf: dict, family: str, where: str) -> None:
    """Settings transformers' deepseek models would run differently from (or that moe_train cannot express)."""
    act = _get(hf, "hidden_act", family)
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (experts are SwiGLU with 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (moe_train's MLPs and experts have no bias)")
    freq = hf.get("moe_layer_freq", 1)
    if freq != 1:
        raise ValueError(f"{where}: moe_layer_freq={freq!r} is not supported: transformers makes every layer after "
                         f"first_k_dense_replace an MoE layer (moe_layer_freq: 1)")
    scoring = hf.get("scoring_func", SCORE_FUNC[family])
    if scoring != SCORE_FUNC[family]:
        raise ValueError(f"{where}: scoring_func={scoring!r}: transformers' {family} always scores experts with "
                         f"{SCORE_FUNC[family]!r}")
    method = hf.get("topk_method", FAMILY_TOPK_METHODS[family][0])
    if method not in FAMILY_TOPK_METHODS[family]:
        raise ValueError(f"{where}: topk_method={method!r} is not supported for {family}; allowed: "
                         f"{FAMILY_TOPK_METHODS[family]}")
    if method != "greedy" and (_get(hf, "n_group", family) is None or _get(hf, "topk_group", family) is None):
        raise ValueError(f"{where}: topk_method={method!r} needs n_group and topk_group (got "
                         f"{_get(hf, 'n_group', family)!r} / {_get(hf, 'topk_group', family)!r})")
    if family == "deepseek_v2" and _get(hf, "norm_topk_prob", family):
        raise ValueError(f"{where}: norm_topk_prob=true: transformers' DeepseekV2 never renormalises the top-k "
                         f"weights (it ignores this key), so the model it runs is ambiguous; set it to false")
    heads, kv = _get(hf, "num_attention_heads", family), _get(hf, "num_key_value_heads", family)
    if kv is not None and kv != heads:
        raise ValueError(f"{where}: num_key_value_heads={kv} differs from num_attention_heads={heads}; under MLA "
                         f"every head has its own key and value (set them equal)")


def _moe(hf: dict, family: str) -> MoEConfig:
    method = hf.get("topk_method", FAMILY_TOPK_METHODS[family][0])
    groups = (1, 1) if method == "greedy" else (_get(hf, "n_group", family), _get(hf, "topk_group", family))
    num_experts = hf.get("n_routed_experts", hf.get("num_local_experts", _get(hf, "n_routed_experts", family)))
    return MoEConfig(router="topk", num_experts=num_experts, top_k=_get(hf, "num_experts_per_tok", family),
                     norm_topk_prob=bool(_get(hf, "norm_topk_prob", family)),
                     score_func=SCORE_FUNC[family], topk_method=method, n_group=groups[0], topk_group=groups[1],
                     routed_scaling_factor=float(_get(hf, "routed_scaling_factor", family)),
                     use_expert_bias=family == "deepseek_v3")


def deepseek_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """A DeepSeek-V2 / V3 config.json -> ModelConfig (not yet validated; ValueError naming refused fields)."""
    family = hf["model_type"]
    _refuse(hf, family, where)
    max_pos = _get(hf, "max_position_embeddings", family)
    theta, scaling = _rope(hf, family, max_pos, where)
    heads = _get(hf, "num_attention_heads", family)
    return ModelConfig(
        family=family, vocab_size=_get(hf, "vocab_size", family), hidden_size=_get(hf, "hidden_size", family),
        intermediate_size=_get(hf, "moe_intermediate_size", family), num_layers=_get(hf, "num_hidden_layers", family),
        num_heads=heads, num_kv_heads=heads, rope_theta=theta, rms_norm_eps=float(_get(hf, "rms_norm_eps", family)),
        max_seq_len=max_pos, tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", family)),
        attention_bias=bool(_get(hf, "attention_bias", family)), init_std=float(_get(hf, "initializer_range", family)),
        q_lora_rank=_get(hf, "q_lora_rank", family), kv_lora_rank=_get(hf, "kv_lora_rank", family),
        qk_nope_head_dim=_get(hf, "qk_nope_head_dim", family), qk_rope_head_dim=_get(hf, "qk_rope_head_dim", family),
        v_head_dim=_get(hf, "v_head_dim", family),
        rope_interleave=True if family == "deepseek_v2" else bool(_get(hf, "rope_interleave", family)),
        first_k_dense_replace=_get(hf, "first_k_dense_replace", family),
        dense_intermediate_size=_get(hf, "intermediate_size", family),
        n_shared_experts=_get(hf, "n_shared_experts", family), moe=_moe(hf, family), rope_scaling=scaling)


def num_mtp_layers(hf: dict) -> int:
    """DeepSeek-V3's multi-token-prediction layers stored after the decoder layers (0 for other families)."""
    if hf.get("model_type") != "deepseek_v3":
        return 0
    return int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)


def _check_exportable(cfg: ModelConfig) -> None:
    moe, family = cfg.moe, cfg.family
    wrong = [(key, have, want) for key, have, want in (
        ("score_func", moe.score_func, SCORE_FUNC[family]),
        ("norm_topk_prob", moe.norm_topk_prob, False if family == "deepseek_v2" else moe.norm_topk_prob),
        ("rope_interleave", cfg.resolved_rope_interleave, True if family == "deepseek_v2"
         else cfg.resolved_rope_interleave)) if have != want]
    if moe.topk_method not in FAMILY_TOPK_METHODS[family] and not (moe.n_group == 1 or moe.topk_group == moe.n_group):
        wrong.append(("topk_method", moe.topk_method, FAMILY_TOPK_METHODS[family]))
    if cfg.shared_expert_intermediate_size:
        wrong.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, 0))
    if wrong:
        raise ValueError(f"a {family} checkpoint cannot express " + ", ".join(
            f"model.{'moe.' if k not in ('rope_interleave', 'shared_expert_intermediate_size') else ''}{k}={h!r} "
            f"(transformers' {family} has {w!r})" for k, h, w in wrong))


def deepseek_config_to_hf(cfg: ModelConfig) -> dict:
    """The DeepSeek keys of config.json (the caller adds the common ones: dtype, vocab, moe_train extra...)."""
    _check_exportable(cfg)
    moe, family, r = cfg.moe, cfg.family, cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": r.type, "rope_theta": cfg.rope_theta}
    if r.type == "yarn":
        rope.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate,
                    **{k: getattr(r, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                       if getattr(r, k) is not None})
    greedy = moe.topk_method == "greedy" or moe.topk_group >= moe.n_group
    hf = dict(
        intermediate_size=cfg.dense_intermediate_size or cfg.intermediate_size,  # read only by dense layers
        moe_intermediate_size=cfg.intermediate_size, first_k_dense_replace=cfg.first_k_dense_replace,
        n_routed_experts=moe.num_experts, n_shared_experts=cfg.n_shared_experts, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=moe.norm_topk_prob,
        attention_bias=cfg.attention_bias, rope_parameters=rope, num_key_value_heads=cfg.num_heads)
    if family == "deepseek_v2":
        hf.update(topk_method="greedy" if greedy else moe.topk_method, mlp_bias=False,
                  n_group=None if greedy else moe.n_group, topk_group=None if greedy else moe.topk_group)
    else:  # transformers' V3 always routes noaux_tc; one group of all experts is plain greedy top-k
        hf.update(n_group=1 if greedy else moe.n_group, topk_group=1 if greedy else moe.topk_group,
                  rope_interleave=cfg.resolved_rope_interleave, num_nextn_predict_layers=0)
    return hf
