"""Identity / constant null experts inside Megatron's MoELayer: the null term added on the token's own rank.

Megatron's router contract (probs [T, E], routing_map [T, E]) holds only the TRUE experts, so whichever token
dispatcher runs (ours, VariableKAllToAllDispatcher, or Megatron's allgather / unfused alltoall) never permutes, sends
or multiplies a row for a null pick. What an identity / constant null pick returns (moe_train/routing/zero_compute.py,
docs/zero_compute.md) is added here, by the same pure function moe_train's own MoE layer calls:

    route(x)            VariableKRouter -> (probs, routing_map); its last_plan keeps null_idx_TK / null_weight_TK
                        (already scaled like probs by moe_router_topk_scaling_factor); the layer keeps x
    ... dispatch, experts, shared experts (Megatron's, unchanged)
    combine(y)          the dispatcher's token_combine, then null_expert_output(x, null_idx_TK, null_weight_TK,
                        kind, router.null_values): with our dispatcher the combine exchange is in flight meanwhile
    postprocess(y)      Megatron's (combine_postprocess, + shared experts), then + the null term

Both hooks run inside Megatron's custom_forward, so MoE-layer recomputation (moe_layer_recompute) recomputes the
term with its own routing. A router of kind ``zero`` (or Megatron's own router) leaves the layer's math unchanged.

This is the layer with_variable_k builds for every ``VariableKRouting(dispatcher="megatron")``. With
moe_token_dispatcher_type="flex" and the DeepEP backend it also installs flex.deepep_topk into the flex dispatcher
at construction (K = the router's max_slots): DeepEP gets each token's true experts and -1, so null slots are not
sent. HybridEP takes the routing map itself (a null pick is an absent entry): nothing to install. Without DeepEP
installed Megatron's MoEFlexTokenDispatcher itself raises its ImportError: there is no fallback dispatcher.
Shape legend: S sequence, B micro-batch, T = S*B tokens, D hidden, K slots, Z null experts.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from moe_train.parallel.megatron import compat
from moe_train.parallel.megatron.flex import use_deepep_indices
from moe_train.routing.zero_compute import null_expert_output


class ZeroComputeMoELayer(MoELayer):
    """Megatron's MoELayer plus the identity / constant null term of a VariableKRouter (module docstring); the
    token dispatcher is whatever the config names (VariableKMoELayer, its subclass, installs ours)."""

    _null_input: Optional[torch.Tensor] = None
    _null_output: Optional[torch.Tensor] = None

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **compat.moe_layer_kwargs(MoELayer.__init__, **kwargs))
        max_slots = getattr(self.router, "max_slots", None)  # None: Megatron's own router, its own topk is right
        if max_slots is not None and use_deepep_indices(self.token_dispatcher, max_slots):
            self.router.deepep_indices_installed = True

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        self._null_input = hidden_states if getattr(self.router, "null_kind", "zero") != "zero" else None
        return probs, routing_map

    def combine(self, output: torch.Tensor):
        output = super().combine(output)  # our dispatcher: the exchange is issued, waited in postprocess
        self._null_output = self._null_term()  # computed while the combine exchange is in flight
        return output

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        output = super().postprocess(output, shared_expert_output)
        y_TD, self._null_output = self._null_output, None
        if y_TD is None:
            y_TD = self._null_term()  # a caller that ran postprocess without our combine (flex's own stages)
        if y_TD is None:
            return output
        return output + y_TD.view(output.shape).to(output.dtype)

    def _null_term(self) -> Optional[torch.Tensor]:
        """The identity / constant null picks' term of the routed input (once: route() kept the input)."""
        x, self._null_input = self._null_input, None
        if x is None:
            return None
        plan = self.router.last_plan
        return null_expert_output(x.reshape(-1, x.shape[-1]), plan.null_idx_TK, plan.null_weight_TK,
                                  plan.null_kind, getattr(self.router, "null_values", None))
