"""GPT layer specs with our routing and dispatcher: a Megatron-LM training script switches with one line.

    # pretrain_gpt.py, model_provider(): after Megatron builds its spec
    from moe_train.parallel.megatron import adamoe, with_variable_k
    transformer_layer_spec = with_variable_k(transformer_layer_spec, adamoe(num_null_experts=16, top_k=4))

``with_variable_k`` accepts a layer spec (Transformer Engine or local), a decoder block spec
(get_gpt_decoder_block_spec) or an MTP block spec, and returns a copy in which every MoE layer has
VariableKRouter as its router and, with ``routing.dispatcher == "variable_k"`` (default), VariableKMoELayer
(our all-to-all) as its class; with ``"megatron"``, ZeroComputeMoELayer (Megatron's configured dispatcher; the null
term of identity / constant nulls; DeepEP indices with -1 under flex). Experts, shared experts, attention and norms
stay exactly what Megatron chose.
``get_gpt_layer_spec`` / ``get_gpt_decoder_block_spec`` call Megatron's builders and patch their result.
"""

from __future__ import annotations

from typing import Any

from moe_train.parallel.megatron import compat
from moe_train.parallel.megatron.dispatcher import VariableKMoELayer
from moe_train.parallel.megatron.router import VariableKRouter, VariableKRouting
from moe_train.parallel.megatron.zero_compute import ZeroComputeMoELayer


def with_variable_k(spec: Any, routing: VariableKRouting) -> Any:
    """A copy of ``spec`` whose MoE layers route with ``routing`` (and dispatch with ours unless
    routing.dispatcher == "megatron"). Raises ValueError when the spec has no MoE layer."""
    if not isinstance(routing, VariableKRouting):
        raise ValueError(f"routing must be a VariableKRouting (see adamoe(), adak(), topk()), got {routing!r}")
    if routing.dispatcher not in ("variable_k", "megatron"):
        raise ValueError(f"routing.dispatcher={routing.dispatcher!r}: one of 'variable_k', 'megatron'")
    router = VariableKRouter.builder(routing)
    ours = routing.dispatcher == "variable_k"
    # VariableKMoELayer reads permute_backend from the router's routing. With Megatron's dispatcher,
    # ZeroComputeMoELayer adds the identity / constant null term on the token's rank and, under flex with DeepEP,
    # hands DeepEP -1 for null slots (flex.use_deepep_indices); the dispatcher is what the config names.
    layer_cls = VariableKMoELayer if ours else ZeroComputeMoELayer
    new, replaced = compat.map_moe_specs(spec, lambda s: compat.replace_moe_spec(s, router, layer_cls, {}))
    if not replaced:
        raise ValueError("the spec holds no MoE layer: build it with num_experts set (e.g. "
                         "get_gpt_layer_local_spec(num_experts=8)) or pass a decoder block spec of an MoE model")
    return new


def get_gpt_layer_spec(routing: VariableKRouting, use_te: bool = True, **megatron_kwargs) -> Any:
    """Megatron's get_gpt_layer_with_transformer_engine_spec (use_te) or get_gpt_layer_local_spec with
    ``megatron_kwargs`` (num_experts=..., moe_grouped_gemm=..., ...), patched by ``with_variable_k``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not megatron_kwargs.get("num_experts"):
        raise ValueError(f"num_experts={megatron_kwargs.get('num_experts')!r}: a variable-k layer spec is an MoE "
                         "spec; pass num_experts (the number of TRUE experts)")
    build = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec if use_te
             else gpt_layer_specs.get_gpt_layer_local_spec)
    return with_variable_k(build(**megatron_kwargs), routing)


def get_gpt_decoder_block_spec(config, routing: VariableKRouting, use_transformer_engine: bool = True,
                               **megatron_kwargs) -> Any:
    """Megatron's get_gpt_decoder_block_spec (dense and MoE layers per config.moe_layer_freq), with every MoE
    layer patched."""
    from megatron.core.models.gpt import gpt_layer_specs

    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                                       **megatron_kwargs)
    return with_variable_k(block, routing)
