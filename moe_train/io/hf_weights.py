"""Hugging Face tensor names <-> moe_train state dicts (Mixtral / Qwen2-MoE), both directions.

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
the router's state dict beside gate.weight (which router: the MoEConfig in config.json, see io/hf_config.py).

Shape legend: E true experts, Z null experts, A Ada-K actions, D hidden, F expert FFN width.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch

from moe_train.config import ModelConfig
from moe_train.io.hf_config import MOE_TRAIN_KEY
from moe_train.io.safetensors_folder import SafetensorsFolder
from moe_train.model.decoder import MoETransformer

# Where a layer's MoE block lives on disk: Mixtral's published name, and transformers 5's in-memory name.
MOE_PREFIXES = {"mixtral": ("block_sparse_moe.", "mlp."), "qwen2_moe": ("mlp.",)}
# Per-expert Linear names: (gate, up, down).
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}

# Router state beyond gate.weight, for error messages.
_ROUTER_EXTRAS = {"null_gate.weight": "null experts", "allocator.weight": "an Ada-K allocator",
                  "expert_bias": "expert-bias balancing", "null_bias": "a compute budget",
                  "null_bias_integral": "a compute budget"}
# Tensors older checkpoints carry that hold no learned state (recomputed from the config).
_IGNORED_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


# ----------------------------------------------------------------------------------------------------------
# import: HF names -> our state dict


class WeightImporter:
    """Takes tensors by HF name, checks shapes, casts, and remembers what it consumed."""

    def __init__(self, src: SafetensorsFolder, dtype: Optional[torch.dtype], folder: Path):
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

    def check_all_used(self, family: str) -> None:
        """Every stored tensor must have been taken: a leftover means a layout or config this import misreads."""
        unused = sorted(n for n in self.src.names() - self.used if not any(p.fullmatch(n) for p in _IGNORED_TENSORS))
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise ValueError(f"{str(self.folder)!r} holds tensors this {family} config does not explain: {shown}. "
                             f"Unsupported layout (dense layers, extra modules) or config.json does not match the "
                             f"weights")


def _import_experts(imp: WeightImporter, family: str, p: str, E: int, D: int, F: int) -> tuple[torch.Tensor, ...]:
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


def import_state_dict(imp: WeightImporter, cfg: ModelConfig,
                      expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------------------------------------
# export: our model -> HF names


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
