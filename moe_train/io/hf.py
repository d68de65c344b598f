"""Hugging Face checkpoint interchange: Mixtral / Qwen2-MoE folders (config.json + safetensors) <-> MoETransformer.

    from_hf(folder)       config.json -> ModelConfig, safetensors (one file or shards + index) -> our tensors
    to_hf(model, folder)  the reverse, written atomically (temp folder beside it, then renamed into place)

On disk we use the published per-expert names, which is also what transformers 5.x `save_pretrained` writes
(checked against transformers 5.23: its in-memory fused `mlp.experts.gate_up_proj` is split back on save):

    Mixtral    model.layers.{i}.block_sparse_moe.gate.weight                     [E, D]
               model.layers.{i}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight   [F, D] / [F, D] / [D, F]
    Qwen2-MoE  model.layers.{i}.mlp.gate.weight, mlp.experts.{e}.gate_proj / up_proj / down_proj.weight,
               mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight, q/k/v biases
Reading also accepts the fused in-memory layout, `experts.gate_up_proj` [E, 2F, D] (gate rows first) and
`experts.down_proj` [E, D, F], under either layer prefix. Our experts are stacked and pre-transposed for
x @ W: w_gate / w_up [E, D, F], w_down [E, F, D] (an HF Linear weight is [out, in]).

Extras that transformers does not know, stored under the same layer prefix and ignored by transformers:
    {prefix}null_gate.weight [Z, D] (AdaMoE), {prefix}allocator.weight [A, D] (Ada-K), {prefix}expert_bias [E]
(aux-loss-free balancing state) and any other router buffer (e.g. the compute-budget {prefix}null_bias), i.e.
the router's state dict beside gate.weight; the full MoEConfig goes under the "moe_train" key of config.json, so from_hf
rebuilds exactly the router that was saved. `num_experts_per_tok` is what transformers routes with: top_k for
top-k and Ada-K models (Ada-K's base model is the frozen top-k model), the FLOPs-baseline k for null-expert
models (transformers ignores the null gate, so it loads the top-k model the conversion started from).

Shape legend: E true experts, Z null experts, A Ada-K actions, D hidden, F expert FFN width.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_train.config import ConfigError, ModelConfig, MoEConfig, from_dict, validate_model, validate_moe
from moe_train.model.decoder import MoETransformer, RotaryEmbedding

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
MOE_TRAIN_KEY = "moe_train"

MODEL_TYPES = ("mixtral", "qwen2_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Where a layer's MoE block lives on disk: Mixtral's published name, and transformers 5's in-memory name.
MOE_PREFIXES = {"mixtral": ("block_sparse_moe.", "mlp."), "qwen2_moe": ("mlp.",)}
# Per-expert Linear names: (gate, up, down).
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}

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
}

# Files that describe weights or the model config: never carried over from an old folder into a new export.
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                    "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", ".*")
# Router state beyond gate.weight, for error messages.
_ROUTER_EXTRAS = {"null_gate.weight": "null experts", "allocator.weight": "an Ada-K allocator",
                  "expert_bias": "expert-bias balancing", "null_bias": "a compute budget",
                  "null_bias_integral": "a compute budget"}
# Tensors older checkpoints carry that hold no learned state (recomputed from the config).
_IGNORED_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


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


def _get(hf: dict, key: str, family: str) -> Any:
    value = hf.get(key)
    return HF_DEFAULTS[family].get(key) if value is None and key not in hf else value


def _rope_theta(hf: dict, family: str, where: str) -> float:
    """RoPE base as transformers resolves it: rope_scaling or rope_parameters dict, then top-level rope_theta."""
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
    return float(HF_DEFAULTS[family]["rope_theta"] if theta is None else theta)


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
    if window is not None and 0 < window < max_pos:
        raise ValueError(f"{where}: sliding_window={window} (< max_position_embeddings={max_pos}) is in use; "
                         f"moe_train implements full causal attention only. Set sliding_window to null "
                         f"(use_sliding_window: false for Qwen2-MoE) if full attention is what you want")


def config_from_hf(hf: dict, where: str = CONFIG_NAME) -> ModelConfig:
    """Maps a Mixtral / Qwen2-MoE config.json to a validated ModelConfig (ValueError naming unsupported fields)."""
    family = hf.get("model_type")
    if family not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type={family!r} is not supported; supported: {MODEL_TYPES}")
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
    if MOE_TRAIN_KEY in hf:
        cfg.moe = _moe_from_extra(hf[MOE_TRAIN_KEY], cfg.moe, hf, where)
    try:
        validate_model(cfg)
    except ConfigError as e:
        raise ValueError(f"{where} describes a model moe_train cannot build: {e}") from None
    return cfg


def _hf_top_k(moe: MoEConfig) -> int:
    """The k transformers routes with (see the module docstring)."""
    return moe.resolved_baseline_top_k if moe.router == "null" else moe.top_k


def _moe_from_extra(extra: Any, from_hf_fields: MoEConfig, hf: dict, where: str) -> MoEConfig:
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: '{MOE_TRAIN_KEY}' must be a mapping of MoEConfig fields, got {extra!r}")
    try:
        moe = from_dict(MoEConfig, extra, f"{where}:{MOE_TRAIN_KEY}")
        validate_moe(moe, f"{where}:{MOE_TRAIN_KEY}")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    k_key = "num_experts_per_tok"
    for ours, theirs, hf_key in ((moe.num_experts, from_hf_fields.num_experts, "the expert count"),
                                 (moe.norm_topk_prob, from_hf_fields.norm_topk_prob, "norm_topk_prob"),
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
    if family == "mixtral":
        hf.update(intermediate_size=cfg.intermediate_size, num_local_experts=moe.num_experts,
                  router_jitter_noise=0.0)
    else:
        hf.update(intermediate_size=cfg.intermediate_size,  # dense-MLP width: unused, every layer is MoE
                  moe_intermediate_size=cfg.intermediate_size, num_experts=moe.num_experts,
                  shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                  norm_topk_prob=moe.norm_topk_prob, qkv_bias=cfg.attention_bias, decoder_sparse_step=1,
                  mlp_only_layers=[], use_sliding_window=False, layer_types=["full_attention"] * cfg.num_layers)
    hf[MOE_TRAIN_KEY] = dataclasses.asdict(moe)
    return hf


# ----------------------------------------------------------------------------------------------------------
# reading safetensors


class _SafetensorsFolder:
    """Name -> tensor over a folder's model.safetensors or its shards (model.safetensors.index.json)."""

    def __init__(self, folder: Path, stack: ExitStack):
        single, index = folder / SAFE_WEIGHTS_NAME, folder / SAFE_INDEX_NAME
        if single.is_file():  # transformers' order of preference
            files = {single.name: single}
            handle = stack.enter_context(safe_open(str(single), framework="pt"))
            self._where = {name: handle for name in handle.keys()}
        elif index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
            files = {name: folder / name for name in sorted(set(weight_map.values()))}
            for name, file in files.items():
                if not file.is_file():
                    raise ValueError(f"{index} lists shard {name!r}, which is missing from {str(folder)!r}")
            handles = {name: stack.enter_context(safe_open(str(file), framework="pt")) for name, file in files.items()}
            self._where = {}
            for tensor_name, file_name in weight_map.items():
                if tensor_name not in set(handles[file_name].keys()):
                    raise ValueError(f"{index} says {tensor_name!r} is in {file_name!r}, but that shard lacks it")
                self._where[tensor_name] = handles[file_name]
        else:
            raise ValueError(f"{str(folder)!r} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}; only safetensors "
                             f"checkpoints are read (re-save .bin checkpoints with save_pretrained)")
        self.files = files

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        return list(self._where[name].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._where[name].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def stored_dtype(path: Union[str, Path]) -> torch.dtype:
    """The floating dtype a checkpoint's tensors are stored in (e.g. to convert bf16 -> bf16 without upcasting)."""
    with ExitStack() as stack:
        src = _SafetensorsFolder(Path(path), stack)
        for name in sorted(src.names()):
            dtype = _SAFETENSORS_FLOATS.get(src.dtype_name(name))
            if dtype is not None:
                return dtype
    return torch.float32


class _Importer:
    """Takes tensors by HF name, checks shapes, casts, and remembers what it consumed."""

    def __init__(self, src: _SafetensorsFolder, dtype: Optional[torch.dtype], folder: Path):
        self.src, self.dtype, self.folder, self.used = src, dtype, folder, set()

    def has(self, name: str) -> bool:
        return name in self.src

    def take(self, name: str, shape: Iterable[int], why: str = "") -> torch.Tensor:
        if name not in self.src:
            raise ValueError(f"{str(self.folder)!r}: tensor {name!r} is missing{why}")
        got, want = self.src.shape(name), list(shape)
        if got != want:
            raise ValueError(f"{str(self.folder)!r}: tensor {name!r} has shape {got}, expected {want} from config.json")
        self.used.add(name)
        t = self.src.get(name)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t


def _import_experts(imp: _Importer, family: str, p: str, E: int, D: int, F: int) -> tuple[torch.Tensor, ...]:
    """(w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]) from per-expert Linear weights or the fused layout."""
    if imp.has(f"{p}experts.gate_up_proj"):
        gate_up_EOD = imp.take(f"{p}experts.gate_up_proj", [E, 2 * F, D])
        down_EDF = imp.take(f"{p}experts.down_proj", [E, D, F])
        return (gate_up_EOD[:, :F].transpose(1, 2).contiguous(), gate_up_EOD[:, F:].transpose(1, 2).contiguous(),
                down_EDF.transpose(1, 2).contiguous())
    g, u, d = EXPERT_NAMES[family]
    w_gate = torch.stack([imp.take(f"{p}experts.{e}.{g}.weight", [F, D]).t() for e in range(E)])
    w_up = torch.stack([imp.take(f"{p}experts.{e}.{u}.weight", [F, D]).t() for e in range(E)])
    w_down = torch.stack([imp.take(f"{p}experts.{e}.{d}.weight", [D, F]).t() for e in range(E)])
    return w_gate, w_up, w_down


def _import_state_dict(imp: _Importer, cfg: ModelConfig, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (names and shapes from ``expected``, a meta model's state dict) from HF-named tensors."""
    family, moe = cfg.family, cfg.moe
    D, F, E = cfg.hidden_size, cfg.intermediate_size, moe.num_experts
    sd: dict[str, torch.Tensor] = {}

    def plain(ours: str, theirs: str) -> None:
        sd[ours] = imp.take(theirs, expected[ours].shape)

    plain("embed_tokens.weight", "model.embed_tokens.weight")
    plain("norm.weight", "model.norm.weight")
    if cfg.tie_word_embeddings:
        if imp.has("lm_head.weight"):
            imp.take("lm_head.weight", expected["lm_head.weight"].shape)  # saved untied copy: the tie wins
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = imp.take("lm_head.weight", expected["lm_head.weight"].shape,
                                        " (tie_word_embeddings is false, so the output projection must be stored)")
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plain(f"{o}{norm}.weight", f"{h}{norm}.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            plain(f"{o}self_attn.{proj}.weight", f"{h}self_attn.{proj}.weight")
            if f"{o}self_attn.{proj}.bias" in expected:
                plain(f"{o}self_attn.{proj}.bias", f"{h}self_attn.{proj}.bias")
        prefixes = [h + pre for pre in MOE_PREFIXES[family]]
        p = next((q for q in prefixes if imp.has(q + "gate.weight")), prefixes[0])
        r = f"{o}moe.router."
        for ours in [k for k in expected if k.startswith(r)]:
            rel = ours[len(r):]  # gate.weight, and the extras of null / Ada-K / bias-balanced routers
            why = "" if rel == "gate.weight" else (f" (config.json '{MOE_TRAIN_KEY}' describes a router with "
                                                   f"{_ROUTER_EXTRAS.get(rel, 'this state')})")
            sd[ours] = imp.take(p + rel, expected[ours].shape, why)
        sd[f"{o}moe.experts.w_gate"], sd[f"{o}moe.experts.w_up"], sd[f"{o}moe.experts.w_down"] = _import_experts(
            imp, family, p, E, D, F)
        S = cfg.shared_expert_intermediate_size
        if S:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                plain(f"{o}moe.shared_expert.{proj}.weight", f"{p}shared_expert.{proj}.weight")
            plain(f"{o}moe.shared_expert_gate.weight", f"{p}shared_expert_gate.weight")
        elif family == "qwen2_moe":
            # transformers keeps a zero-width shared expert (it adds sigmoid(g) * 0): consume it if present.
            for proj, shape in (("gate_proj", [0, D]), ("up_proj", [0, D]), ("down_proj", [D, 0])):
                if imp.has(f"{p}shared_expert.{proj}.weight"):
                    imp.take(f"{p}shared_expert.{proj}.weight", shape)
            if imp.has(f"{p}shared_expert_gate.weight"):
                imp.take(f"{p}shared_expert_gate.weight", [1, D])
    return sd


def from_hf(path: Union[str, Path], dtype: Optional[torch.dtype] = torch.float32) -> MoETransformer:
    """Builds a MoETransformer from a Hugging Face Mixtral / Qwen2-MoE folder.

    ``dtype``: every floating tensor is cast to it; None keeps the stored dtype. The model is built on the meta
    device and the loaded tensors are assigned into it (no random init, no second full copy of the weights).
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, f"{folder / CONFIG_NAME}")
    with torch.device("meta"):
        skeleton = MoETransformer(cfg)
    expected = skeleton.state_dict()
    with ExitStack() as stack:
        src = _SafetensorsFolder(folder, stack)
        imp = _Importer(src, dtype, folder)
        sd = _import_state_dict(imp, cfg, expected)
        unused = sorted(n for n in src.names() - imp.used if not any(p.fullmatch(n) for p in _IGNORED_TENSORS))
    if unused:
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise ValueError(f"{str(folder)!r} holds tensors this {cfg.family} config does not explain: {shown}. "
                         f"Unsupported layout (dense layers, extra modules) or config.json does not match the weights")
    assert set(sd) == set(expected), sorted(set(sd) ^ set(expected))
    skeleton.load_state_dict(sd, strict=True, assign=True)
    model = skeleton
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True made two Parameters of one tensor
    # Non-persistent buffers are not in a checkpoint: recompute them off the meta device (fp32 RoPE table).
    model.rotary = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"from_hf left tensors on the meta device: {left}"
    return model


# ----------------------------------------------------------------------------------------------------------
# writing


def parse_shard_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "2GiB" (2^30), "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size={size!r} must be >= 1 byte")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a string like '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "b").lower()
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} must be >= 1 byte")
    return value


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def export_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """HF name -> tensor, in file order (embeddings, layers, final norm, head)."""
    cfg = model.config
    family = cfg.family
    D = cfg.hidden_size
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _cpu(model.embed_tokens.weight)}
    g_name, u_name, d_name = EXPERT_NAMES[family]
    for i, layer in enumerate(model.layers):
        h = f"model.layers.{i}."
        p = h + MOE_PREFIXES[family][0]
        out[h + "input_layernorm.weight"] = _cpu(layer.input_layernorm.weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, proj)
            out[f"{h}self_attn.{proj}.weight"] = _cpu(lin.weight)
            if lin.bias is not None:
                out[f"{h}self_attn.{proj}.bias"] = _cpu(lin.bias)
        out[h + "post_attention_layernorm.weight"] = _cpu(layer.post_attention_layernorm.weight)
        # The router's whole state under the layer prefix: gate.weight is what transformers reads; the rest
        # (null_gate.weight, allocator.weight, expert_bias, null-budget buffers) only from_hf reads.
        for rel, t in layer.moe.router.state_dict().items():
            if rel == "expert_bias" and t.abs().sum() > 0:
                warnings.warn(f"layer {i}: the aux-loss-free expert bias is nonzero; it is saved as "
                              f"{p}expert_bias, which transformers ignores, so transformers will route without it")
            out[p + rel] = _cpu(t)
        ex = layer.moe.experts
        for e in range(ex.num_experts):
            out[f"{p}experts.{e}.{g_name}.weight"] = _cpu(ex.w_gate[e].t())
            out[f"{p}experts.{e}.{u_name}.weight"] = _cpu(ex.w_up[e].t())
            out[f"{p}experts.{e}.{d_name}.weight"] = _cpu(ex.w_down[e].t())
        if layer.moe.shared_expert is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}shared_expert.{proj}.weight"] = _cpu(getattr(layer.moe.shared_expert, proj).weight)
            out[p + "shared_expert_gate.weight"] = _cpu(layer.moe.shared_expert_gate.weight)
        elif family == "qwen2_moe":
            # transformers' Qwen2-MoE always has a shared expert; a zero-width one adds exactly 0.
            dt = ex.w_gate.dtype
            out[p + "shared_expert.gate_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[p + "shared_expert.up_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[p + "shared_expert.down_proj.weight"] = torch.zeros(D, 0, dtype=dt)
            out[p + "shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dt)
    out["model.norm.weight"] = _cpu(model.norm.weight)
    if not cfg.tie_word_embeddings:  # a tied head is rebuilt from the embedding (transformers does the same)
        out["lm_head.weight"] = _cpu(model.lm_head.weight)
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy in file order: a shard closes before the tensor that would push it past ``limit``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_weight_or_config(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in _WEIGHT_PATTERNS)


def write_folder_atomically(dst: Union[str, Path], write: Callable[[Path], None],
                            carry_from: Iterable[Union[str, Path]] = ()) -> Path:
    """Runs ``write(tmp)`` into a fresh folder beside ``dst``, then swaps it into place.

    Files of the ``carry_from`` folders that are not weights or config.json (tokenizer, generation config,
    README) are copied in first, later folders winning. A crash before the swap leaves ``dst`` untouched (and a
    hidden ``.{name}.tmp-*`` folder); the swap is two renames (old -> hidden ``.{name}.old-*``, new -> dst).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"export path {str(dst)!r} exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        for src in carry_from:
            src = Path(src)
            if not src.is_dir():
                continue
            for entry in sorted(src.iterdir()):
                if _is_weight_or_config(entry.name):
                    continue
                target = tmp / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                if entry.is_dir():
                    shutil.copytree(entry, target)
                else:
                    shutil.copy2(entry, target)
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def to_hf(model: MoETransformer, path: Union[str, Path], max_shard_size: Union[int, str] = "5GB",
          extra_config: Optional[dict] = None, carry_from: Iterable[Union[str, Path]] = ()) -> Path:
    """Writes ``model`` as a Hugging Face folder (config.json + safetensors, sharded with an index when the
    weights exceed ``max_shard_size``); returns the folder. A plain top-k model loads in transformers
    (AutoModelForCausalLM); null gates, allocators and the MoEConfig are extras only from_hf reads.

    ``extra_config``: more config.json keys (e.g. bos/eos token ids) that must not clash with ours.
    ``carry_from``: folders whose non-weight files (tokenizer, ...) are copied in; an existing ``path`` always is.
    """
    if not isinstance(model, MoETransformer):
        raise ValueError(f"to_hf expects a moe_train MoETransformer, got {type(model).__name__}")
    limit = parse_shard_size(max_shard_size)
    dtype = model.embed_tokens.weight.dtype
    hf = config_to_hf(model.config, dtype)
    for key, value in (extra_config or {}).items():
        if key in hf and hf[key] != value:
            raise ValueError(f"extra_config[{key!r}]={value!r} clashes with the exported config ({hf[key]!r})")
        hf[key] = value
    tensors = export_state_dict(model)
    shards = _plan_shards(tensors, limit)

    def write(folder: Path) -> None:
        with open(folder / CONFIG_NAME, "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
            f.write("\n")
        if len(shards) == 1:
            save_file(tensors, str(folder / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
            return
        weight_map = {}
        for j, names in enumerate(shards):
            file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(folder / SAFE_INDEX_NAME, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")

    dst = Path(path)
    return write_folder_atomically(dst, write, [dst, *carry_from])
