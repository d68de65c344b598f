"""LongCat-Flash Hugging Face folders <-> moe_train (config.json and tensors), as transformers' longcat_flash has them.

config.json (LongcatFlashConfig)                  ModelConfig
    num_layers (num_hidden_layers = 2x)               num_layers (each layer: two attention sublayers, model/longcat.py)
    ffn_hidden_size                                   dense_intermediate_size (the two dense MLPs of each layer)
    expert_ffn_hidden_size, n_routed_experts          intermediate_size, moe.num_experts
    zero_expert_num                                   moe.num_null_experts, null_kind identity (router null; topk at 0)
    moe_topk, routed_scaling_factor                   moe.top_k, moe.routed_scaling_factor (no renormalisation)
    q_lora_rank, kv_lora_rank, qk_{nope,rope}_head_dim, v_head_dim     the same (MLA; head_dim = qk_rope_head_dim)
Tensors, per layer i (ours `layers.{i}.X` <- theirs `model.layers.{i}.X` for attention, norms and dense MLPs):
    mlp.router.classifier.weight [n + z, D]           moe.router.gate.weight [n, D] ; moe.router.null_gate.weight [z, D]
    mlp.router.e_score_correction_bias [n + z]        moe.router.expert_bias [n] ; moe.router.null_expert_bias [z]
    mlp.experts.{e}.gate_proj / up_proj / down_proj (e < n)              moe.experts.w_gate / w_up / w_down [n, ...]
transformers before 5.25 kept gate/up rows for the z identity experts that it never used (gate_up_proj [n + z, 2F,
D]; 5.25 builds [n, 2F, D]): folders that carry them are read and the rows dropped; exports write the n FFN experts. With a compute budget (model.moe.target_true_experts) the correction
bias written for the zero experts is null_expert_bias + the controller's null_bias, so transformers routes as we do;
null_expert_bias and the controller state also travel as extras (mlp.router.*) that only from_hf reads.
Shape legend: E = n routed experts, Z = z zero-computation experts, D hidden, F expert width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from moe_train.config import ConfigError, ModelConfig, MoEConfig, validate_model
from moe_train.io.hf_common import MOE_TRAIN_KEY, parse_moe_extra, rope_theta
from moe_train.routing.registry import router_class

FAMILY = "longcat_flash"
ARCHITECTURE = "LongcatFlashForCausalLM"
PREFIX = "mlp."  # the MoE block of a layer
# transformers 5.24 LongcatFlashConfig defaults, used where config.json leaves a field out.
DEFAULTS: dict[str, Any] = dict(
    vocab_size=131072, hidden_size=6144, num_layers=28, num_attention_heads=64, num_key_value_heads=None,
    hidden_act="silu", max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
    tie_word_embeddings=False, attention_bias=False, ffn_hidden_size=12288, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, head_dim=64, v_head_dim=128, qk_head_dim=None, moe_topk=12,
    n_routed_experts=512, zero_expert_num=256, expert_ffn_hidden_size=2048, routed_scaling_factor=6.0,
    router_bias=False, rope_theta=10000000.0)


def _get(hf: dict, key: str) -> Any:
    return hf[key] if key in hf else DEFAULTS[key]


def _check_supported(hf: dict, where: str) -> None:
    """Refuses, by name, what transformers' LongCat-Flash would compute differently from model/longcat.py."""
    rope, nope = _get(hf, "qk_rope_head_dim"), _get(hf, "qk_nope_head_dim")
    checks = [
        (_get(hf, "hidden_act") != "silu", "hidden_act", "'silu' (SwiGLU experts and MLPs)"),
        (bool(_get(hf, "router_bias")), "router_bias", "false (moe_train routers have no logit bias)"),
        (_get(hf, "q_lora_rank") is None, "q_lora_rank",
         "an integer (LongCat-Flash's MLA always has a low-rank query)"),
        (_get(hf, "head_dim") != rope, "head_dim",
         f"equal to qk_rope_head_dim={rope} (transformers rotates head_dim dims of the rope part)"),
        (_get(hf, "qk_head_dim") not in (None, nope + rope), "qk_head_dim", f"qk_nope_head_dim + qk_rope_head_dim = "
                                                                        f"{nope + rope}"),
        (hf.get("zero_expert_type", "identity") != "identity", "zero_expert_type",
         "'identity' (the zero-computation experts transformers implements)"),
    ]
    for bad, key, allowed in checks:
        if bad:
            raise ValueError(f"{where}: {key}={hf.get(key, DEFAULTS.get(key))!r} is not supported; must be {allowed}")


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """A LongCat-Flash config.json -> validated ModelConfig (ValueError naming what cannot be reproduced)."""
    _check_supported(hf, where)
    heads = _get(hf, "num_attention_heads")
    kv_heads = _get(hf, "num_key_value_heads")
    n, z = _get(hf, "n_routed_experts"), _get(hf, "zero_expert_num") or 0
    # transformers derives num_hidden_layers = 2 x num_layers (two attention sublayers each) and accepts either key
    layers = hf["num_hidden_layers"] // 2 if "num_layers" not in hf and "num_hidden_layers" in hf \
        else _get(hf, "num_layers")
    moe = MoEConfig(router="null_experts" if z else "topk", num_experts=n, num_null_experts=z,
                    null_kind="identity" if z else "zero", top_k=_get(hf, "moe_topk"), norm_topk_prob=False,
                    routed_scaling_factor=float(_get(hf, "routed_scaling_factor")), use_expert_bias=True)
    cfg = ModelConfig(
        family=FAMILY, vocab_size=_get(hf, "vocab_size"), hidden_size=_get(hf, "hidden_size"),
        intermediate_size=_get(hf, "expert_ffn_hidden_size"), num_layers=layers, num_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads, rope_theta=rope_theta(hf, DEFAULTS["rope_theta"], where),
        rms_norm_eps=float(_get(hf, "rms_norm_eps")), max_seq_len=_get(hf, "max_position_embeddings"),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings")), attention_bias=bool(_get(hf, "attention_bias")),
        q_lora_rank=_get(hf, "q_lora_rank"), kv_lora_rank=_get(hf, "kv_lora_rank"),
        qk_nope_head_dim=_get(hf, "qk_nope_head_dim"), qk_rope_head_dim=_get(hf, "qk_rope_head_dim"),
        v_head_dim=_get(hf, "v_head_dim"), dense_intermediate_size=_get(hf, "ffn_hidden_size"),
        init_std=float(_get(hf, "initializer_range")), moe=moe)
    if MOE_TRAIN_KEY in hf:
        cfg.moe = _moe_from_extra(hf[MOE_TRAIN_KEY], moe, where)
    try:
        validate_model(cfg)
    except ConfigError as e:
        raise ValueError(f"{where} describes a model moe_train cannot build: {e}") from None
    return cfg


def _moe_from_extra(extra: Any, from_hf: MoEConfig, where: str) -> MoEConfig:
    """Our saved MoEConfig (router state, budget, losses), checked against the fields transformers routes with."""
    moe = parse_moe_extra(extra, where)
    for key, hf_key in (("num_experts", "n_routed_experts"), ("num_null_experts", "zero_expert_num"),
                        ("top_k", "moe_topk"), ("routed_scaling_factor", "routed_scaling_factor"),
                        ("norm_topk_prob", "norm_topk_prob (always false)")):
        if getattr(moe, key) != getattr(from_hf, key):
            raise ValueError(f"{where}: {hf_key}={getattr(from_hf, key)!r} disagrees with the '{MOE_TRAIN_KEY}' "
                             f"section ({key}={getattr(moe, key)!r}); edit both consistently, or delete "
                             f"'{MOE_TRAIN_KEY}'")
    return moe


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict:
    """The config.json transformers' LongcatFlashForCausalLM needs, plus our MoEConfig under "moe_train"."""
    moe = cfg.moe
    if cfg.rope_scaling.type != "default":
        raise ValueError(f"model.rope_scaling.type={cfg.rope_scaling.type!r}: the LongCat-Flash export writes plain "
                         f"RoPE only")
    if router_class(moe.router).variable_k:  # a per-token k (Ada-K, top-p): not LongCat-Flash's fixed-k router
        raise ValueError(f"model.moe.router={moe.router!r} cannot be exported as LongCat-Flash (topk or null_experts "
                         f"with identity zero experts)")
    return {
        "architectures": [ARCHITECTURE], "model_type": FAMILY, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "ffn_hidden_size": cfg.dense_intermediate_size, "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "head_dim": cfg.qk_rope_head_dim,
        "qk_head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "moe_topk": moe.top_k, "n_routed_experts": moe.num_experts, "zero_expert_num": moe.num_null_experts,
        "expert_ffn_hidden_size": cfg.intermediate_size, "routed_scaling_factor": moe.routed_scaling_factor,
        "router_bias": False, "output_router_logits": False, "use_cache": True, "dtype": dtype_name,
        "torch_dtype": dtype_name, MOE_TRAIN_KEY: dataclasses.asdict(moe),
    }


# ----------------------------------------------------------------------------------------------------------
# tensors


def import_layer(imp, cfg: ModelConfig, expected: dict[str, torch.Tensor], i: int, sd: dict,
                 experts: Optional[tuple[int, int]] = None) -> None:
    """Layer i's tensors into ``sd`` (our names), from ``imp`` (a hf_weights.WeightImporter); ``experts=(lo, hi)``:
    only those FFN experts (one rank's shard)."""
    o, h = f"layers.{i}.", f"model.layers.{i}."
    E, Z, D, F = cfg.moe.num_experts, cfg.moe.num_null_experts, cfg.hidden_size, cfg.intermediate_size
    lo, hi = experts or (0, E)
    for ours in [k for k in expected if k.startswith(o) and not k.startswith(o + "moe.")]:
        sd[ours] = imp.take(h + ours[len(o):], expected[ours].shape)  # attention, norms, dense MLPs: same names
    p, r = h + PREFIX, o + "moe.router."
    classifier = imp.take(p + "router.classifier.weight", [E + Z, D])  # FFN experts' rows, then the zero experts'
    bias = imp.take(p + "router.e_score_correction_bias", [E + Z])
    split = {"gate.weight": classifier[:E], "null_gate.weight": classifier[E:], "expert_bias": bias[:E],
             "null_expert_bias": bias[E:]}
    for ours in [k for k in expected if k.startswith(r)]:
        rel = ours[len(r):]
        if rel == "null_expert_bias" and imp.has(p + "router.null_expert_bias"):  # budget: the bias was a sum
            sd[ours] = imp.take(p + "router.null_expert_bias", [Z])
        elif rel in split:
            sd[ours] = split[rel].clone()
        else:  # router state transformers does not have (compute budget, ...)
            sd[ours] = imp.take(p + "router." + rel, expected[ours].shape, " (config.json 'moe_train' describes "
                                "a router with this state)")
    if hi == lo:  # no experts asked for (a caller that reads the rest of the layer: its router)
        w_gate, w_up, w_down = torch.empty(0, D, F), torch.empty(0, D, F), torch.empty(0, F, D)
    elif imp.has(p + "experts.gate_up_proj"):  # transformers' in-memory layout
        # [E, 2F, D] since transformers 5.25; [E + Z, 2F, D] before (rows for the zero experts, never used)
        rows = E + Z if Z and imp.src.shape(p + "experts.gate_up_proj")[0] == E + Z else E
        gate_up_EOD = imp.take(p + "experts.gate_up_proj", [rows, 2 * F, D])[lo:hi]
        w_gate, w_up = gate_up_EOD[:, :F].transpose(1, 2), gate_up_EOD[:, F:].transpose(1, 2)
        w_down = imp.take(p + "experts.down_proj", [E, D, F])[lo:hi].transpose(1, 2)
    else:
        w_gate = torch.stack([imp.take(f"{p}experts.{e}.gate_proj.weight", [F, D]).t() for e in range(lo, hi)])
        w_up = torch.stack([imp.take(f"{p}experts.{e}.up_proj.weight", [F, D]).t() for e in range(lo, hi)])
        w_down = torch.stack([imp.take(f"{p}experts.{e}.down_proj.weight", [D, F]).t() for e in range(lo, hi)])
        for e in range(E, E + Z if experts is None else E):  # gate / up rows of the identity experts: unused
            for proj in ("gate_proj", "up_proj"):
                if imp.has(f"{p}experts.{e}.{proj}.weight"):
                    imp.take(f"{p}experts.{e}.{proj}.weight", [F, D])
    x = o + "moe.experts."
    sd[x + "w_gate"], sd[x + "w_up"], sd[x + "w_down"] = (w.contiguous() for w in (w_gate, w_up, w_down))


def export_layer(layer, cfg: ModelConfig, i: int, cpu) -> dict[str, torch.Tensor]:
    """Layer i's tensors under transformers' names (``cpu``: detach to a contiguous CPU tensor)."""
    h = f"model.layers.{i}."
    p = h + PREFIX
    out = {h + k: cpu(t) for k, t in layer.state_dict().items() if not k.startswith("moe.")}
    router, ex = layer.moe.router, layer.moe.experts
    E, Z = cfg.moe.num_experts, cfg.moe.num_null_experts
    classifier = router.gate.weight if Z == 0 else torch.cat([router.gate.weight, router.null_gate.weight])
    zeros = router.gate.weight.new_zeros
    true_b = router.expert_bias if router.expert_bias is not None else zeros(E)
    null_b = zeros(Z)
    if Z:
        null_b = router.null_expert_bias if router.null_expert_bias is not None else null_b
        if router.null_bias is not None:  # the budget's shared bias selects too: transformers sees the sum
            null_b = null_b + router.null_bias
    out[p + "router.classifier.weight"] = cpu(classifier)  # [E + Z, D]
    out[p + "router.e_score_correction_bias"] = cpu(torch.cat([true_b, null_b]))
    for rel, t in router.state_dict().items():  # what transformers does not have: only from_hf reads it
        if rel not in ("gate.weight", "null_gate.weight", "expert_bias") and \
                (rel != "null_expert_bias" or router.null_bias is not None):
            out[p + "router." + rel] = cpu(t)
    for e in range(E):  # the FFN experts only (transformers >= 5.25 builds gate_up_proj as [E, 2F, D])
        out[f"{p}experts.{e}.gate_proj.weight"] = cpu(ex.w_gate[e].t())
        out[f"{p}experts.{e}.up_proj.weight"] = cpu(ex.w_up[e].t())
        out[f"{p}experts.{e}.down_proj.weight"] = cpu(ex.w_down[e].t())
    return out
