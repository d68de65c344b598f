"""LoRA on attention projections and on the stacked expert projections.

    W x  ->  W x + (alpha / r) * B (A x),   A: r x in (small random), B: out x r (zeros): the start equals the base
For experts every projection gets a stacked pair per expert, A [E, in, r] and B [E, r, out], computed with the same
grouped GEMM over the rows each expert received, so null picks still cost nothing. ``merge_lora_state_dict`` folds
the deltas into the base weights of a (gathered) full state dict: the final saved model is a plain model.
Shape legend: N rows grouped by expert, D hidden, F expert FFN width, E experts, r rank.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import LORA_TARGETS as TARGETS  # the one list (config.py validates against it too)
from moe_train.kernels.grouped_gemm import grouped_mm
from moe_train.model.experts import GroupedExperts

# The attention projections LoRA wraps (those a layer has): GQA's q/k/v/o, and DeepSeek MLA's (model/mla.py) full or
# low-rank query, the joint key/value latent and its expansion, and the output. Latent norms stay as they are.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                         "kv_b_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class LoRAGroupedExperts(GroupedExperts):
    """GroupedExperts plus a low-rank delta per expert and projection; base parameters shared with the original."""

    def __init__(self, base: GroupedExperts, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.num_experts, self.backend = base.num_experts, base.backend
        self.ep_shard = base.ep_shard  # wrapping an expert shard: the adapters below are stacked over its block
        self.w_gate, self.w_up, self.w_down = base.w_gate, base.w_up, base.w_down
        self.scale = alpha / rank
        E, D, Fw = base.w_gate.shape
        dev = base.w_gate.device
        for name, (i, o) in {"gate": (D, Fw), "up": (D, Fw), "down": (Fw, D)}.items():
            a = nn.Parameter(torch.empty(E, i, rank, device=dev))
            nn.init.normal_(a, std=1.0 / math.sqrt(i))
            setattr(self, f"lora_{name}_A", a)  # [E, in, r]
            setattr(self, f"lora_{name}_B", nn.Parameter(torch.zeros(E, rank, o, device=dev)))  # [E, r, out]

    def _proj(self, x: torch.Tensor, name: str, counts_E: torch.Tensor) -> torch.Tensor:
        w = getattr(self, f"w_{name}")
        a, b = getattr(self, f"lora_{name}_A"), getattr(self, f"lora_{name}_B")
        # rank r is usually not 16-byte aligned for _grouped_mm: the low-rank products use the loop reference
        low = grouped_mm(grouped_mm(x, a, counts_E, "auto"), b, counts_E, "auto")
        return grouped_mm(x, w, counts_E, self.backend) + low * self.scale

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        h = F.silu(self._proj(x_ND, "gate", counts_E)) * self._proj(x_ND, "up", counts_E)
        return self._proj(h, "down", counts_E)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """Adds LoRA in place to the chosen targets of every decoder layer; returns the model."""
    unknown = set(targets) - set(TARGETS)
    if unknown or rank < 1:
        raise ValueError(f"LoRA targets {sorted(unknown)} / rank {rank}: targets must be among {TARGETS}, rank >= 1")
    for layer in model.layers:
        if "attention" in targets:
            # LongCat-Flash layers hold two attention sublayers (model/longcat.py): a ModuleList
            attns = layer.self_attn if isinstance(layer.self_attn, nn.ModuleList) else [layer.self_attn]
            for attn in attns:
                for name in ATTENTION_PROJECTIONS:
                    if isinstance(getattr(attn, name, None), nn.Linear):  # GQA or MLA (q_proj or q_a / q_b_proj)
                        setattr(attn, name, LoRALinear(getattr(attn, name), rank, alpha))
        if "experts" in targets and layer.moe is not None:  # dense-first layers (DeepSeek) have no experts
            layer.moe.experts = LoRAGroupedExperts(layer.moe.experts, rank, alpha)
    return model


@torch.no_grad()
def merge_lora_state_dict(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict -> the plain model's, deltas folded in (works on gathered full tensors, so
    it serves parallelized models too). ``alpha`` is the LoRA alpha; the rank is read off the tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base.weight"):  # LoRALinear: W + (alpha / r) B A
            prefix = key[: -len(".base.weight")]
            a, b = state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"]
            out[f"{prefix}.weight"] = value + (b @ a) * (alpha / a.shape[0])
        elif key.endswith(".base.bias"):
            out[key[: -len(".base.bias")] + ".bias"] = value
        elif any(key.endswith(f"experts.w_{n}") for n in ("gate", "up", "down")) and \
                f"{key.rsplit('.w_', 1)[0]}.lora_{key.rsplit('.w_', 1)[1]}_A" in state:
            prefix, name = key.rsplit(".w_", 1)
            a, b = state[f"{prefix}.lora_{name}_A"], state[f"{prefix}.lora_{name}_B"]
            out[key] = value + torch.bmm(a, b) * (alpha / a.shape[2])
        else:
            out[key] = value
    return out


def _lora_unit(name: str) -> str:
    """The module whose tensors merge_lora_state_dict needs together: a LoRALinear (its base.* and lora_*), a
    stacked-expert module (w_* and lora_*_A/B), else the tensor's own module."""
    for mark in (".base.", ".lora_"):
        if mark in name:
            return name.split(mark)[0]
    return name.rpartition(".")[0]


def merge_lora_stream(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], alpha: float
                      ) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], Iterator[tuple[str, torch.Tensor]]]:
    """merge_lora_state_dict over a stream of full tensors (a streamed save of a sharded model): the merged
    specs (computed on meta tensors), and the merged tensors, one module's worth held at a time."""
    meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in specs.items()}
    merged_specs = {n: (tuple(t.shape), t.dtype) for n, t in merge_lora_state_dict(meta, alpha).items()}

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        group: dict[str, torch.Tensor] = {}
        for name, t in tensors:
            if group and _lora_unit(name) != _lora_unit(next(iter(group))):
                yield from merge_lora_state_dict(group, alpha).items()
                group = {}
            group[name] = t
        if group:
            yield from merge_lora_state_dict(group, alpha).items()

    return merged_specs, merged()
