"""AdaMoE conversion (arXiv 2406.13233): turn a pretrained top-k MoE into a null-expert model.

Every layer's top-k router becomes a NullExpertRouter with the SAME true gate W_g, m null experts whose gate is
W_null = W_g repeated m/n times (each true expert starts with m/n null twins of equal logit), and a larger k over
the n + m experts. The experts, attention and embeddings are untouched. baseline_top_k (the FLOPs baseline)
defaults to the original k; e.g. Mixtral-8x7B: n=8, top-2 -> m=16, k=4, baseline 2.

    add_null_experts(model, m, k)                 in place on a loaded model (returns it)
    convert_to_adamoe(src, dst, m, k)             Hugging Face folder -> converted Hugging Face folder

Shape legend: E = n true experts, Z = m null experts, D hidden.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from moe_train.config import ConfigError, MoEConfig, validate_moe
from moe_train.io.hf import config_from_hf, from_hf, read_hf_config, stored_dtype, to_hf
from moe_train.model.decoder import MoETransformer
from moe_train.routing.null_experts import NullExpertRouter

# config.json keys of the source that the export does not produce but a converted model should keep.
_CARRIED_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_conversion(moe: MoEConfig, num_null_experts: int, top_k: int,
                     baseline_top_k: Optional[int] = None) -> MoEConfig:
    """The converted MoEConfig, or ValueError naming the argument and what is allowed (no work done)."""
    n = moe.num_experts
    if moe.router != "topk":
        raise ValueError(f"AdaMoE conversion starts from a top-k model; this model's router is {moe.router!r}"
                         + (f" with {moe.num_null_experts} null experts already" if moe.router == "null" else ""))
    if not _is_int(num_null_experts) or num_null_experts < 1:
        raise ValueError(f"num_null_experts={num_null_experts!r} must be an integer >= 1")
    if num_null_experts % n:
        raise ValueError(f"num_null_experts={num_null_experts} must be a multiple of the {n} true experts (the null "
                         f"gate starts as the true gate repeated m/n times), e.g. {n}, {2 * n} or {4 * n}")
    if not _is_int(top_k) or not 1 <= top_k <= n + num_null_experts:
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, {n + num_null_experts}] "
                         f"(the {n} true + {num_null_experts} null experts)")
    baseline = moe.top_k if baseline_top_k is None else baseline_top_k
    if not _is_int(baseline) or not 1 <= baseline <= n:
        raise ValueError(f"baseline_top_k={baseline_top_k!r} must be an integer in [1, {n}] (the top-k the FLOPs "
                         f"are reported against; default: the original top_k={moe.top_k})")
    new = dataclasses.replace(moe, router="null", num_null_experts=num_null_experts, top_k=top_k,
                              baseline_top_k=baseline)
    try:
        validate_moe(new)
    except ConfigError as e:
        raise ValueError(f"the converted MoE config is invalid: {e}") from None
    return new


@torch.no_grad()
def swap_routers(model: MoETransformer, new_moe: MoEConfig, router_cls, init) -> MoETransformer:
    """Replaces every layer's router with ``router_cls(D, new_moe)``, built for real (it is small, so every buffer
    starts at its own initial value) on the old gate's device and dtype, holding a copy of the old true gate with its
    requires_grad and the old training mode; ``init(old, new)`` sets what the new router adds. Updates
    ``model.config`` and returns the same model. Build optimizers afterwards: the routers are new modules."""
    D = model.config.hidden_size
    for layer in model.layers:
        old = layer.moe.router
        gate = old.gate.weight
        new = router_cls(D, new_moe).to(device=gate.device, dtype=gate.dtype)
        new.gate.weight.copy_(gate)
        new.gate.weight.requires_grad_(gate.requires_grad)
        init(old, new)
        new.train(old.training)
        layer.moe.router = new
    model.config = dataclasses.replace(model.config, moe=new_moe)
    return model


def add_null_experts(model: MoETransformer, num_null_experts: int, top_k: int,
                     baseline_top_k: Optional[int] = None) -> MoETransformer:
    """Replaces every layer's top-k router with a NullExpertRouter (true gate kept, null gate = W_g repeated m/n
    times), updates ``model.config``, and returns the same model."""
    new_moe = check_conversion(model.config.moe, num_null_experts, top_k, baseline_top_k)

    def init(old, new):
        new.init_null_gate_from_true()
        new.null_gate.weight.requires_grad_(old.gate.weight.requires_grad)
        if old.expert_bias is not None:  # aux-loss-free balancing state carries over to the true experts
            new.expert_bias.copy_(old.expert_bias)

    return swap_routers(model, new_moe, NullExpertRouter, init)


def convert_to_adamoe(src: Union[str, Path], dst: Union[str, Path], num_null_experts: int, top_k: int,
                      baseline_top_k: Optional[int] = None, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Hugging Face top-k checkpoint ``src`` -> AdaMoE checkpoint ``dst`` (from_hf + add_null_experts + to_hf).

    Arguments are validated against src's config.json before any weight is read. Weights keep their stored
    dtype; the tokenizer and other non-weight files of ``src`` are copied along, with its token ids. ``dst`` is
    written atomically and may equal ``src``. Returns ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    hf = read_hf_config(src)
    check_conversion(config_from_hf(hf, str(src / "config.json")).moe, num_null_experts, top_k, baseline_top_k)
    model = from_hf(src, dtype=stored_dtype(src))
    add_null_experts(model, num_null_experts, top_k, baseline_top_k)
    extra = {key: hf[key] for key in _CARRIED_HF_KEYS if key in hf}
    return to_hf(model, dst, max_shard_size=max_shard_size, extra_config=extra, carry_from=[src])
