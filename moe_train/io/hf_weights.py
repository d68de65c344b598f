"""Hugging Face tensor names <-> moe_train state dicts (Mixtral / Qwen2-MoE), both directions.

On disk we use the published per-expert names, which is also what transformers 5.x `save_pretrained` writes
(checked against transformers 5.23: its in-memory fused `mlp.experts.gate_up_proj` is split back on save):

    Mixtral    model.layers.{i}.block_sparse_moe.gate.weight                     [E, D]
               model.layers.{i}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight   [F, D] / [F, D] / [D, F]
    Qwen2-MoE  model.layers.{i}.mlp.gate.weight, mlp.experts.{e}.gate_proj / up_proj / down_proj.weight,
               mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight, q/k/v biases
    Qwen3-MoE  as Qwen2-MoE without the shared expert, plus self_attn.q_norm / k_norm.weight [Hd] (and an o bias)
    LongCat-Flash  io/hf_longcat.py (two attention sublayers, dense MLPs, one classifier over FFN + zero experts)
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

import logging
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch

from moe_train.config import ModelConfig
from moe_train.io import hf_longcat
from moe_train.io.hf_common import MOE_TRAIN_KEY
from moe_train.io.hf_deepseek import DEEPSEEK_FAMILIES
from moe_train.io.safetensors_folder import SafetensorsFolder
from moe_train.model.decoder import MoETransformer

logger = logging.getLogger(__name__)

# Where a layer's MoE block lives on disk: Mixtral's published name, and transformers 5's in-memory name.
MOE_PREFIXES = {"mixtral": ("block_sparse_moe.", "mlp."), "qwen2_moe": ("mlp.",), "qwen3_moe": ("mlp.",),
                "longcat_flash": ("mlp.",), "deepseek_v2": ("mlp.",), "deepseek_v3": ("mlp.",)}
# Per-expert Linear names: (gate, up, down).
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
                "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                "deepseek_v2": ("gate_proj", "up_proj", "down_proj"),
                "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
                "longcat_flash": ("gate_proj", "up_proj", "down_proj")}

# Router state beyond gate.weight, for error messages.
_ROUTER_EXTRAS = {"null_gate.weight": "null experts", "allocator.weight": "an Ada-K allocator",
                  "expert_bias": "expert-bias balancing", "null_bias": "a compute budget",
                  "null_bias_integral": "a compute budget"}
# Tensors older checkpoints carry that hold no learned state (recomputed from the config).
_IGNORED_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)
# Per family, tensors transformers itself skips on load: LongCat-Flash's multi-token-prediction module (model.mtp.*,
# its _keys_to_ignore_on_load_unexpected), used for speculative decoding only.
_IGNORED_BY_FAMILY = {"longcat_flash": (re.compile(r"model\.mtp\..*"),)}


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
        ignored = _IGNORED_TENSORS + _IGNORED_BY_FAMILY.get(family, ())
        unused = sorted(n for n in self.src.names() - self.used if not any(p.fullmatch(n) for p in ignored))
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise ValueError(f"{str(self.folder)!r} holds tensors this {family} config does not explain: {shown}. "
                             f"Unsupported layout (dense layers, extra modules) or config.json does not match the "
                             f"weights")


def _import_experts(imp: WeightImporter, family: str, p: str, E: int, D: int, F: int,
                    experts: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, ...]:
    """(w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]) from per-expert Linear weights or the fused layout;
    ``experts=(lo, hi)``: only those experts (one rank's shard: the others' tensors are never read)."""
    lo, hi = experts or (0, E)
    if hi == lo:  # no experts asked for (a caller that reads the rest of the layer: its router)
        return torch.empty(0, D, F), torch.empty(0, D, F), torch.empty(0, F, D)
    if imp.has(f"{p}experts.gate_up_proj"):
        gate_up_EOD = imp.take(f"{p}experts.gate_up_proj", [E, 2 * F, D])[lo:hi]
        down_EDF = imp.take(f"{p}experts.down_proj", [E, D, F])[lo:hi]
        return (gate_up_EOD[:, :F].transpose(1, 2).contiguous(), gate_up_EOD[:, F:].transpose(1, 2).contiguous(),
                down_EDF.transpose(1, 2).contiguous())
    g, u, d = EXPERT_NAMES[family]
    w_gate = torch.stack([imp.take(f"{p}experts.{e}.{g}.weight", [F, D]).t() for e in range(lo, hi)])
    w_up = torch.stack([imp.take(f"{p}experts.{e}.{u}.weight", [F, D]).t() for e in range(lo, hi)])
    w_down = torch.stack([imp.take(f"{p}experts.{e}.{d}.weight", [D, F]).t() for e in range(lo, hi)])
    return w_gate, w_up, w_down


def import_state_dict(imp: WeightImporter, cfg: ModelConfig,
                      expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (names and shapes from ``expected``, a meta model's state dict) from HF-named tensors."""
    sd = import_globals(imp, cfg, expected)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    for i in range(cfg.num_layers):
        sd.update(import_layer(imp, cfg, expected, i))
    return sd


def import_globals(imp: WeightImporter, cfg: ModelConfig, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers: embedding, final norm, head (none when tied to the embedding)."""
    sd = {name: imp.take(theirs, expected[name].shape) for name, theirs in
          (("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"))}
    if cfg.tie_word_embeddings:
        if imp.has("lm_head.weight"):
            imp.take("lm_head.weight", expected["lm_head.weight"].shape)  # saved untied copy: the tie wins
    else:
        sd["lm_head.weight"] = imp.take("lm_head.weight", expected["lm_head.weight"].shape,
                                        " (tie_word_embeddings is false, so the output projection must be stored)")
    return sd


def import_layer(imp: WeightImporter, cfg: ModelConfig, expected: dict[str, torch.Tensor], i: int,
                 experts: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """Decoder layer i's tensors under our names; ``experts=(lo, hi)``: the stacked experts hold those only."""
    family, moe = cfg.family, cfg.moe
    D, F, E = cfg.hidden_size, cfg.intermediate_size, moe.num_experts
    sd: dict[str, torch.Tensor] = {}

    def plain(ours: str, theirs: str) -> None:
        sd[ours] = imp.take(theirs, expected[ours].shape)

    o, h = f"layers.{i}.", f"model.layers.{i}."
    if family in DEEPSEEK_FAMILIES:
        return _import_deepseek_layer(imp, cfg, expected, i, experts)
    if family == hf_longcat.FAMILY:  # two attention sublayers, dense MLPs, one classifier over n + z experts
        hf_longcat.import_layer(imp, cfg, expected, i, sd, experts)
        return sd
    for norm in ("input_layernorm", "post_attention_layernorm"):
        plain(f"{o}{norm}.weight", f"{h}{norm}.weight")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        plain(f"{o}self_attn.{proj}.weight", f"{h}self_attn.{proj}.weight")
        if f"{o}self_attn.{proj}.bias" in expected:
            plain(f"{o}self_attn.{proj}.bias", f"{h}self_attn.{proj}.bias")
    for norm in ("q_norm", "k_norm"):  # Qwen3-MoE's per-head q / k RMSNorm
        if f"{o}self_attn.{norm}.weight" in expected:
            plain(f"{o}self_attn.{norm}.weight", f"{h}self_attn.{norm}.weight")
    prefixes = [h + pre for pre in MOE_PREFIXES[family]]
    p = next((q for q in prefixes if imp.has(q + "gate.weight")), prefixes[0])
    r = f"{o}moe.router."
    for ours in [k for k in expected if k.startswith(r)]:
        rel = ours[len(r):]  # gate.weight, and the extras of null / Ada-K / bias-balanced routers
        why = "" if rel == "gate.weight" else (f" (config.json '{MOE_TRAIN_KEY}' describes a router with "
                                               f"{_ROUTER_EXTRAS.get(rel, 'this state')})")
        sd[ours] = imp.take(p + rel, expected[ours].shape, why)
    sd[f"{o}moe.experts.w_gate"], sd[f"{o}moe.experts.w_up"], sd[f"{o}moe.experts.w_down"] = _import_experts(
        imp, family, p, E, D, F, experts)
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
    """A contiguous host tensor; meta tensors stay meta (the export's layout pass: names, shapes and dtypes)."""
    return t.detach().contiguous() if t.is_meta else t.detach().to("cpu").contiguous()


def _nonzero(t: torch.Tensor) -> bool:
    return not t.is_meta and bool(t.abs().sum() > 0)


def export_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """HF name -> tensor, in file order (embeddings, layers, final norm, head)."""
    out = export_head(model)
    for i, layer in enumerate(model.layers):
        out.update(export_layer(layer, model.config, i))
    out.update(export_tail(model))
    return out


def export_head(model: MoETransformer) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": _cpu(model.embed_tokens.weight)}


def export_tail(model: MoETransformer) -> dict[str, torch.Tensor]:
    out = {"model.norm.weight": _cpu(model.norm.weight)}
    if not model.config.tie_word_embeddings:  # a tied head is rebuilt from the embedding (transformers does the same)
        out["lm_head.weight"] = _cpu(model.lm_head.weight)
    return out


def export_layer(layer: torch.nn.Module, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """Decoder layer i under the family's HF names, in file order."""
    family = cfg.family
    D = cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    g_name, u_name, d_name = EXPERT_NAMES[family]
    h = f"model.layers.{i}."
    p = h + MOE_PREFIXES[family][0]
    if family in DEEPSEEK_FAMILIES:
        return _export_deepseek_layer(layer, cfg, i)
    if family == hf_longcat.FAMILY:
        return hf_longcat.export_layer(layer, cfg, i, _cpu)
    out[h + "input_layernorm.weight"] = _cpu(layer.input_layernorm.weight)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(layer.self_attn, proj)
        out[f"{h}self_attn.{proj}.weight"] = _cpu(lin.weight)
        if lin.bias is not None:
            out[f"{h}self_attn.{proj}.bias"] = _cpu(lin.bias)
    for norm in ("q_norm", "k_norm"):  # Qwen3-MoE
        if getattr(layer.self_attn, norm, None) is not None:
            out[f"{h}self_attn.{norm}.weight"] = _cpu(getattr(layer.self_attn, norm).weight)
    out[h + "post_attention_layernorm.weight"] = _cpu(layer.post_attention_layernorm.weight)
    # The router's whole state under the layer prefix: gate.weight is what transformers reads; the rest
    # (null_gate.weight, allocator.weight, expert_bias, null-budget buffers) only from_hf reads.
    for rel, t in layer.moe.router.state_dict().items():
        if rel == "expert_bias" and _nonzero(t):
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
    return out


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V2 / V3: one decoder layer. Our names equal HF's under the layer prefix (MLA projections and norms,
# a dense layer's mlp.{gate,up,down}_proj) except three: our moe.* is HF's mlp.*, the stacked experts are
# mlp.experts.{e}.{gate,up,down}_proj (or the fused layout), and the router's expert_bias is DeepSeek-V3's
# mlp.gate.e_score_correction_bias (the selection-only bias; a V2 bias is an extra, mlp.expert_bias).


def _deepseek_name(ours_rel: str, family: str) -> str:
    """HF name (under model.layers.{i}.) of one of our layer-relative names, experts aside."""
    if ours_rel == "moe.router.expert_bias" and family == "deepseek_v3":
        return "mlp.gate.e_score_correction_bias"
    if ours_rel.startswith("moe.router."):
        return "mlp." + ours_rel[len("moe.router."):]
    if ours_rel.startswith("moe."):
        return "mlp." + ours_rel[len("moe."):]
    return ours_rel


def _import_deepseek_layer(imp: WeightImporter, cfg: ModelConfig, expected: dict[str, torch.Tensor],
                           i: int, experts: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    o, h = f"layers.{i}.", f"model.layers.{i}."
    sd: dict[str, torch.Tensor] = {}
    for ours in [k for k in expected if k.startswith(o) and not k.startswith(f"{o}moe.experts.")]:
        rel = ours[len(o):]
        leaf = rel[len("moe.router."):] if rel.startswith("moe.router.") else "gate.weight"
        why = "" if leaf == "gate.weight" else (f" (config.json '{MOE_TRAIN_KEY}' describes a router with "
                                                 f"{_ROUTER_EXTRAS.get(leaf, 'this state')})")
        sd[ours] = imp.take(h + _deepseek_name(rel, cfg.family), expected[ours].shape, why)
    if cfg.is_moe_layer(i):
        sd[f"{o}moe.experts.w_gate"], sd[f"{o}moe.experts.w_up"], sd[f"{o}moe.experts.w_down"] = _import_experts(
            imp, cfg.family, h + "mlp.", cfg.moe.num_experts, cfg.hidden_size, cfg.intermediate_size, experts)
        if cfg.family == "deepseek_v2" and imp.has(h + "mlp.gate.e_score_correction_bias"):
            raise ValueError(f"{str(imp.folder)!r}: {h}mlp.gate.e_score_correction_bias is a DeepSeek-V3 tensor; "
                             f"config.json says deepseek_v2, whose router has no correction bias")
    return sd


def _export_deepseek_layer(layer, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    h = f"model.layers.{i}."
    out: dict[str, torch.Tensor] = {}
    for rel, t in layer.state_dict().items():
        if rel.startswith("moe.experts."):
            continue
        if rel == "moe.router.expert_bias" and cfg.family == "deepseek_v2" and _nonzero(t):
            warnings.warn(f"layer {i}: the expert bias is nonzero; transformers' DeepseekV2 has none, so it routes "
                          f"without it (saved as {h}mlp.expert_bias for from_hf)")
        out[h + _deepseek_name(rel, cfg.family)] = _cpu(t)
    if layer.moe is not None:
        p, ex = h + "mlp.", layer.moe.experts
        if cfg.family == "deepseek_v3" and p + "gate.e_score_correction_bias" not in out:
            out[p + "gate.e_score_correction_bias"] = torch.zeros(ex.num_experts, dtype=torch.float32)
        for e in range(ex.num_experts):
            out[f"{p}experts.{e}.gate_proj.weight"] = _cpu(ex.w_gate[e].t())
            out[f"{p}experts.{e}.up_proj.weight"] = _cpu(ex.w_up[e].t())
            out[f"{p}experts.{e}.down_proj.weight"] = _cpu(ex.w_down[e].t())
    return out


def skip_mtp_layers(imp: WeightImporter, cfg: ModelConfig, num_mtp: int) -> None:
    """DeepSeek-V3's multi-token-prediction layers (model.layers.L ... L + num_mtp - 1): transformers' causal LM does
    not build them (it ignores them on load), so neither do we; their tensors count as consumed."""
    if num_mtp <= 0:
        return
    prefixes = tuple(f"model.layers.{cfg.num_layers + j}." for j in range(num_mtp))
    skipped = sorted(n for n in imp.src.names() if n.startswith(prefixes))
    if skipped:
        logger.warning("skipping %d tensors of %d multi-token-prediction layer(s) (%s...): transformers' causal LM "
                       "does not use them", len(skipped), num_mtp, prefixes[0])
    imp.used.update(skipped)
