"""Weights between Megatron-Core and moe_train, and the AdaMoE conversion of a Megatron checkpoint.

* ``add_null_experts(state_dict, m)``: every ``...router.weight`` [E, D] gets ``...router.null_weight`` =
  weight repeated m/E times (AdaMoE's initialisation: each true expert starts with m/E null twins of equal
  logit). ``convert_checkpoint_file`` does it on a Megatron ``torch``-format checkpoint file
  (``model_optim_rng.pt``, keys ``model`` or ``model0``, ``model1``, ... with virtual pipeline stages).
  Loading a top-k checkpoint straight into a VariableKRouter does the same on the fly (router.py); the
  offline file is for tools that load strictly (the optimizer state has no null gate: resume with
  ``--no-load-optim``, as a fine-tune). ``torch_dist`` (sharded) checkpoints: load them into a top-k model,
  save in ``torch`` format, convert (not automated here).
* ``router_state_from_moe_train`` / ``sequential_mlp_state_from_moe_train``: moe_train router / GroupedExperts
  weights as the state of a VariableKRouter / Megatron SequentialMLP (fc1 = [gate; up] rows, as Megatron's
  gated_linear_unit chunks them; fc2 = down), for importing moe_train models and for the equivalence tests.
Shape legend: E true experts, m null experts, D hidden, F expert FFN width, A Ada-K actions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from moe_train.routing.null_experts import null_gate_from_true

ROUTER_SUFFIX = "router.weight"


def add_null_experts(state_dict: dict, num_null_experts: int) -> dict:
    """A new state dict with ``...router.null_weight`` beside every ``...router.weight``."""
    if num_null_experts < 1:
        raise ValueError(f"num_null_experts={num_null_experts} must be >= 1")
    out = dict(state_dict)
    routers = [k for k in state_dict if k.endswith(ROUTER_SUFFIX)]
    if not routers:
        raise ValueError(f"no key ending in {ROUTER_SUFFIX!r} in this state dict: not a Megatron MoE model "
                         f"(first keys: {list(state_dict)[:5]})")
    for key in routers:
        null_key = key[: -len("weight")] + "null_weight"
        if null_key in state_dict:
            raise ValueError(f"{null_key} already exists: this checkpoint already has null experts")
        out[null_key] = null_gate_from_true(state_dict[key], num_null_experts, "num_moe_experts").clone()
    return out


def _model_keys(ckpt: dict) -> list[str]:
    keys = [k for k in ckpt if k == "model" or (k.startswith("model") and k[5:].isdigit())]
    if not keys:
        raise ValueError(f"no 'model' entry in this checkpoint (keys: {sorted(ckpt)[:10]}): expected a Megatron "
                         "torch-format model_optim_rng.pt")
    return keys


def convert_checkpoint_file(src: str | Path, dst: str | Path, num_null_experts: int) -> int:
    """Writes ``dst`` = ``src`` with null gates added to every MoE layer; returns the number of routers."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    n = 0
    for key in _model_keys(ckpt):
        before = ckpt[key]
        ckpt[key] = add_null_experts(before, num_null_experts)
        n += len(ckpt[key]) - len(before)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return n


def router_state_from_moe_train(router) -> dict[str, torch.Tensor]:
    """moe_train TopKRouter / NullExpertRouter / AdaKRouter -> VariableKRouter state dict."""
    out = {"weight": router.gate.weight.detach().clone()}
    if getattr(router, "null_gate", None) is not None:
        out["null_weight"] = router.null_gate.weight.detach().clone()
    if getattr(router, "allocator", None) is not None:
        out["allocator_weight"] = router.allocator.weight.detach().clone()
    if getattr(router, "null_values", None) is not None:  # constant null experts
        out["null_values"] = router.null_values.detach().clone()
    return out


def sequential_mlp_state_from_moe_train(experts, local_expert_indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """moe_train GroupedExperts (w_gate/w_up [E, D, F], w_down [E, F, D]) -> SequentialMLP state for the given
    global experts: local_experts.{i}.linear_fc1.weight [2F, D], local_experts.{i}.linear_fc2.weight [D, F]."""
    out = {}
    for i, e in enumerate(local_expert_indices):
        out[f"local_experts.{i}.linear_fc1.weight"] = torch.cat(
            [experts.w_gate[e].detach().t(), experts.w_up[e].detach().t()], dim=0).contiguous()
        out[f"local_experts.{i}.linear_fc2.weight"] = experts.w_down[e].detach().t().contiguous()
    return out
