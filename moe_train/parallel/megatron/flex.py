"""DeepEP top-k indices for Megatron's flex dispatcher: null / unused slots carry -1, so they cost no communication.

Megatron's flex dispatcher (moe_token_dispatcher_type="flex") hands DeepEP a [T, K] expert index tensor, built in
``_DeepepManager.setup_metadata`` as ``torch.topk(probs, router_topk)`` over the [T, E] probabilities, and masks
entries to -1 only under a capacity factor (where a dropped pick has probability 0). DeepEP documents -1 as "no
expert": such a slot is neither sent nor combined. With variable k (AdaMoE null picks, Ada-K's k < k_max) a token's
row of the routing map holds fewer than K true experts, and topk would fill the rest with experts of probability 0:
real rows sent over the network and computed with weight 0. ``deepep_topk`` builds the indices from the routing map
instead: the token's TRUE experts, lowest index first, then -1 (probability 0) for every remaining slot, so DeepEP
moves exactly the true assignments, as our own all-to-all does (parallel/exchange.py).

HybridEP (moe_flex_dispatcher_backend="hybridep") consumes the [T, E] routing map itself, where a null pick is an
absent entry already: it needs nothing from here.

Wiring: ``use_deepep_indices(token_dispatcher, max_slots)`` replaces the DeepEP manager's setup_metadata of one
MoEFlexTokenDispatcher with one that calls deepep_topk. ZeroComputeMoELayer (the layer with_variable_k builds for
``VariableKRouting(dispatcher="megatron")``) calls it at construction with the router's max_slots. The dispatch,
the permutation of received rows (-1 skipped by Megatron's own ``_indices_to_multihot``) and the combine are
Megatron's and DeepEP's unchanged; they need DeepEP's GPUs and have not been run here (bench/gpu_check.py
``deepep_indices`` checks DeepEP's layout and dispatch of these indices where DeepEP is installed).
Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import types

import torch


def deepep_topk(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, max_slots: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices_TK int64, probs_TK float32) for DeepEP: each token's true experts (routing_map True) in ascending
    expert order, then -1 with probability 0. ``max_slots`` (K) must be at least the most true experts any token
    has (the router's max_slots): a token with more would lose picks, so that is checked on the device."""
    T, E = routing_map_TE.shape
    assert probs_TE.shape == (T, E), (tuple(probs_TE.shape), (T, E))
    assert 1 <= max_slots, max_slots
    K = min(max_slots, E)
    # one topk, as Megatron's own conversion: a picked expert scores E - e > 0 (lower index first), others 0
    score_TE = torch.where(routing_map_TE, torch.arange(E, 0, -1, device=routing_map_TE.device), 0)
    top_TK, idx_TK = torch.topk(score_TE, K, dim=-1)
    picked_TK = top_TK > 0
    torch._assert_async(routing_map_TE.sum(-1).max() <= K if T else torch.tensor(True),
                        "deepep_topk: a token has more true experts than max_slots")
    indices_TK = torch.where(picked_TK, idx_TK, -1)
    probs_TK = torch.where(picked_TK, probs_TE.gather(1, idx_TK), 0).float()  # DeepEP takes float32 probs
    if max_slots > K:  # more slots than experts: the extra slots are -1 too
        pad = max_slots - K
        indices_TK = torch.cat([indices_TK, indices_TK.new_full((T, pad), -1)], dim=1)
        probs_TK = torch.cat([probs_TK, probs_TK.new_zeros((T, pad))], dim=1)
    return indices_TK, probs_TK


def use_deepep_indices(token_dispatcher, max_slots: int) -> bool:
    """For a Megatron MoEFlexTokenDispatcher with the DeepEP backend: its setup_metadata builds the [T, K] indices
    with deepep_topk. ``max_slots`` is the router's (most true experts per token); K = tp_size * max_slots, as
    Megatron's own router_topk = tp_size * moe_router_topk: the flex dispatcher repeats every pick over the
    expert-tensor-parallel ranks (its routing map covers tp_size * E experts). Returns False (nothing changed) for
    any other dispatcher or backend (HybridEP takes the routing map as it is). The manager's own attributes stay the
    ones DeepEP reads: token_indices, token_probs."""
    manager = getattr(token_dispatcher, "_comm_manager", None)
    if manager is None or type(manager).__name__ != "_DeepepManager":
        return False
    max_slots = getattr(token_dispatcher, "tp_size", 1) * max_slots

    def setup_metadata(self, routing_map: torch.Tensor, probs: torch.Tensor) -> None:
        num_tokens = routing_map.shape[0]
        routing_map = routing_map.reshape(num_tokens, self.num_experts)
        probs = probs.reshape(num_tokens, self.num_experts)
        self.token_indices, self.token_probs = deepep_topk(routing_map, probs, max_slots)

    manager.router_topk = max_slots
    manager.setup_metadata = types.MethodType(setup_metadata, manager)
    return True
