"""moe_train inside Megatron-Core: null experts (AdaMoE), Ada-K and our variable-k all-to-all (docs/megatron.md).

    from moe_train.parallel.megatron import adamoe, with_variable_k
    layer_spec = with_variable_k(layer_spec, adamoe(num_null_experts=16, top_k=4))

Importing this package needs megatron-core (>= 0.16.1); compat.py raises one clear ImportError otherwise.
"""

from moe_train.parallel.megatron import compat
from moe_train.parallel.megatron.convert import (
                                                 add_null_experts,
                                                 convert_checkpoint_file,
                                                 router_state_from_moe_train,
                                                 sequential_mlp_state_from_moe_train,
)
from moe_train.parallel.megatron.dispatcher import VariableKAllToAllDispatcher, VariableKMoELayer, routing_map_to_slots
from moe_train.parallel.megatron.router import VariableKRouter, VariableKRouting, adak, adamoe, topk
from moe_train.parallel.megatron.spec import get_gpt_decoder_block_spec, get_gpt_layer_spec, with_variable_k
from moe_train.parallel.megatron.zero_compute import ZeroComputeMoELayer

__all__ = ["compat", "add_null_experts", "convert_checkpoint_file", "router_state_from_moe_train",
           "sequential_mlp_state_from_moe_train", "VariableKAllToAllDispatcher", "VariableKMoELayer",
           "routing_map_to_slots", "VariableKRouter", "VariableKRouting", "adak", "adamoe", "topk",
           "get_gpt_decoder_block_spec", "get_gpt_layer_spec", "with_variable_k", "ZeroComputeMoELayer"]
