"""Hugging Face exports that run the trained model: which loaders run an export faithfully, and, for routers
transformers does not have, the modeling code the folder carries (loaded with ``trust_remote_code=True``).

    native            transformers' own family model computes exactly our model: top-k routers (any family),
                      LongCat-Flash's identity zero experts, DeepSeek-V3's correction bias. No code is shipped.
    trust_remote_code null experts (zero / identity / constant), Ada-K allocators (greedy, their inference mode),
                      top-p routing, and a top-k router whose nonzero expert bias the family's transformers model
                      ignores. config.json gets model_type "moe_train" and an auto_map to the two files of this
                      folder (configuration_moe_train.py, modeling_moe_train.py: plain torch, no moe_train import),
                      which are copied into the export. A distinct model_type on purpose: transformers (or vLLM)
                      without trust_remote_code then refuses the folder instead of silently running a plain top-k
                      model (the null gates ignored as unexpected weights).
The family's own config fields and tensor names stay as they are, so moe_train's from_hf reads either kind of export
(io/hf_config.py maps model_type "moe_train" back to the family named by "moe_train_family").
Neither reproduces training-time expert capacity drops (model.moe.capacity_factor): they depend on the batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from moe_train.config import ModelConfig
from moe_train.model.rope import mla_softmax_scale, rope_tables
from moe_train.routing.registry import router_class

REMOTE_MODEL_TYPE = "moe_train"
FAMILY_KEY = "moe_train_family"  # the family whose layout the weights have
MODEL_KEY = "moe_train_model"  # the decoder, resolved, for modeling_moe_train.py
ARCHITECTURE = "MoeTrainForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_moe_train.MoeTrainConfig",
            "AutoModel": "modeling_moe_train.MoeTrainModel",
            "AutoModelForCausalLM": "modeling_moe_train.MoeTrainForCausalLM"}
FILES = ("configuration_moe_train.py", "modeling_moe_train.py")
GENERATION_CONFIG = "generation_config.json"
# modeling_moe_train.py implements these families' layouts; LongCat-Flash exports only what transformers runs natively
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
# families whose transformers router adds the selection bias (DeepSeek-V3's e_score_correction_bias, LongCat's)
BIASED_FAMILIES = ("deepseek_v3", "longcat_flash")


def remote_code_reason(cfg: ModelConfig, expert_bias_nonzero: bool) -> Optional[str]:
    """Why transformers' own family model would not compute this model (None: it computes it exactly).
    ``expert_bias_nonzero``: some layer's router holds a nonzero expert bias."""
    moe = cfg.moe
    if cfg.family == "longcat_flash":
        return None  # io/hf_longcat.py refuses what transformers' LongCat-Flash cannot run
    reason = router_class(moe.router).hf_remote_reason(moe)  # null experts, an allocator, top-p (routing/base.py)
    if reason is not None:
        return reason
    if expert_bias_nonzero and cfg.family not in BIASED_FAMILIES:
        return f"a nonzero expert bias, which transformers' {cfg.family} router does not add"
    return None


def remote_config(hf: dict, cfg: ModelConfig) -> dict:
    """config.json of a trust_remote_code export: the family's config.json (``hf``) re-typed as "moe_train", with the
    auto_map and the resolved decoder modeling_moe_train.py builds."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family={cfg.family!r}: exports with their own modeling code support {FAMILIES}")
    inv_freq, attention_factor = rope_tables(cfg)
    model = dict(
        family=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, n_shared_experts=cfg.n_shared_experts,
        dense_intermediate_size=cfg.dense_intermediate_size, init_std=cfg.init_std,
        moe_layers=[cfg.is_moe_layer(i) for i in range(cfg.num_layers)], k_max=cfg.moe.resolved_k_max,
        # the exact fp32 tables moe_train computes (plain or yarn): a JSON float holds an fp32 value exactly
        rope_inv_freq=inv_freq.tolist(), rope_attention_factor=float(attention_factor),
        rope_interleave=cfg.resolved_rope_interleave,
        mla=dict(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                 qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                 softmax_scale=mla_softmax_scale(cfg)) if cfg.uses_mla else None)
    # generate() recomputes the sequence at each step (the shipped model keeps no KV cache)
    return {**hf, "model_type": REMOTE_MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP),
            FAMILY_KEY: cfg.family, MODEL_KEY: model, "use_cache": False}


def write_export_files(folder: Path, hf: dict) -> None:
    """The files beside config.json: the modeling code of a trust_remote_code export (and none left over from an
    earlier one otherwise), and generation_config.json unless a carried one (the source's) is there already."""
    here = Path(__file__).parent
    for name in FILES:
        if hf.get("model_type") == REMOTE_MODEL_TYPE:
            shutil.copyfile(here / name, folder / name)
        elif (folder / name).exists():
            (folder / name).unlink()
    if not (folder / GENERATION_CONFIG).exists():
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        if hf.get("model_type") == REMOTE_MODEL_TYPE:
            gen["use_cache"] = False
        with open(folder / GENERATION_CONFIG, "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
            f.write("\n")


def loaders_message(cfg: ModelConfig, reason: Optional[str], folder: Path) -> str:
    """The export-time line saying which loaders run the export faithfully."""
    caveat = ""
    if cfg.moe.capacity_factor is not None:
        caveat = (f"; model.moe.capacity_factor={cfg.moe.capacity_factor} drops are NOT reproduced outside moe_train "
                  f"training (every loader runs every routed token)")
    if reason is None:
        return (f"HF export {folder}: transformers runs it natively (AutoModelForCausalLM.from_pretrained), as does "
                f"moe_train (from_hf){caveat}")
    return (f"HF export {folder}: its router ({reason}) is not in transformers; the folder carries its modeling code: "
            f"load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) or moe_train's from_hf. "
            f"Loaders without remote code (transformers by default, serving stacks) refuse it (model_type "
            f"{REMOTE_MODEL_TYPE!r}) rather than run it as a plain top-k model{caveat}")
