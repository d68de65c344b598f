"""Rank-side code of tests/test_zero_compute.py's expert-parallel checks (gloo, CPU; spawned by ep_workers.spawn).

One 4-rank spawn runs every check: for null_kind identity and constant and several EXACT shares of null picks (a
plan forced to round(share * T*K) null slots), one MoE layer with ep = 2 (each 2-rank ep group of the dp 2 x ep 2
mesh) and ep = 4 (one group of all ranks) against the same layer in one process on the group's tokens (outputs,
input gradient, every parameter gradient), with the dispatcher's rows and bytes; then the FSDP2-parallel tiny model
with constant null experts (ep_workers.model_checks: full gradients, loss, state dict against the single-process
model).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.moe_layer import MoELayer
from moe_train.routing.plan import RoutingPlan, counts_from_idx
from moe_train.routing.zero_compute import split_null_slots

import ep_workers as EW

TOL = 1e-5  # fp32, relative to the reference's largest entry when above 1 (ep_workers._relerr)
SHARES = (0.0, 0.25, 0.5, 1.0)  # 1.0: every pick is a null pick, no rank sends or receives a row
KINDS = ("identity", "constant")
E, Z, K, D, FF, T_LOCAL = 8, 8, 3, 16, 24, 20


def spawn(fn_name: str, world: int, out_dir) -> list:
    return EW.spawn(globals()[fn_name], world, out_dir, num_ranks=world)


def forced_idx(T: int, share: float, seed: int) -> torch.Tensor:
    """idx [T, K] over E true + Z null experts with exactly round(share * T*K) null picks; distinct per token."""
    g = torch.Generator().manual_seed(seed)
    null_S = torch.zeros(T * K, dtype=torch.bool)
    null_S[torch.randperm(T * K, generator=g)[:round(share * T * K)]] = True
    true_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    nulls_TK = torch.stack([torch.randperm(Z, generator=g)[:K] for _ in range(T)]) + E
    return torch.where(null_S.view(T, K), nulls_TK, true_TK)


def forced_forward(router, idx_TK: torch.Tensor, x_TD: torch.Tensor) -> RoutingPlan:
    """The router's own gates and gate rule on forced picks (so gradients reach both gates)."""
    logits_TN = F.linear(x_TD, torch.cat([router.gate.weight, router.null_gate.weight]))
    probs_TN = torch.softmax(logits_TN.float(), dim=-1)
    e_idx, w, n_idx, n_w = split_null_slots(probs_TN.gather(1, idx_TK), idx_TK, E, router.null_kind,
                                            router.norm_topk_prob)
    zero = probs_TN.new_zeros(())
    return RoutingPlan(expert_idx_TK=e_idx, weight_TK=w, counts_E=counts_from_idx(e_idx, E), aux_loss=zero,
                       z_loss=zero, probs_TN=probs_TN, logits_TN=logits_TN, null_idx_TK=n_idx, null_weight_TK=n_w,
                       null_kind=router.null_kind)


def _layer(kind: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=D, intermediate_size=FF, moe=MoEConfig(
        router="null_experts", num_experts=E, num_null_experts=Z, top_k=K, null_kind=kind)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def layer_case(view, kind: str, share: float, seed: int) -> dict:
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts

    world, rank, ep = view.world_size, view.rank, view.ep_size
    ref = _layer(kind)
    x_full = torch.randn(world * T_LOCAL, D, generator=torch.Generator().manual_seed(seed))
    proj = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(seed + 1))
    idx_full = forced_idx(world * T_LOCAL, share, seed + 2)
    ref.router.forward = lambda x_TD: forced_forward(ref.router, idx_full, x_TD)
    xr = x_full.clone().requires_grad_(True)
    y_ref, _ = ref(xr[None])
    (y_ref[0] * proj).sum().backward()

    layer = copy.deepcopy(ref)
    layer.zero_grad(set_to_none=True)
    shard_experts(layer.experts, view.ep_rank, ep)
    layer.dispatcher = AllToAllDispatcher(view.ep_group, E)
    sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    layer.router.forward = lambda x_TD: forced_forward(layer.router, idx_full[sl], x_TD)
    x = x_full[sl].clone().requires_grad_(True)
    y, plan = layer(x[None])
    (y[0] * proj[sl]).sum().backward()

    L, lo = E // ep, view.ep_rank * (E // ep)
    err = {"y": EW._relerr(y[0], y_ref[0, sl]), "x_grad": EW._relerr(x.grad, xr.grad[sl])}
    for name, p in layer.named_parameters():
        p_ref = dict(ref.named_parameters())[name]
        if name.startswith("experts."):
            err[f"grad:{name}"] = EW._relerr(p.grad, None if p_ref.grad is None else p_ref.grad[lo:lo + L])
        else:
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g, group=view.ep_group)
            err[f"grad:{name}"] = EW._relerr(g, p_ref.grad if p_ref.grad is not None else torch.zeros_like(g))
    counts_all = [torch.zeros_like(plan.counts_E) for _ in range(ep)]
    dist.all_gather(counts_all, plan.counts_E, group=view.ep_group)
    st = layer.dispatcher.last
    ffn_TK = plan.expert_idx_TK >= 0
    ffn_remote = int((ffn_TK & ((plan.expert_idx_TK // L) != view.ep_rank)).sum())
    return {"kind": kind, "share": share, "slots": plan.expert_idx_TK.numel(), "ffn_local": int(ffn_TK.sum()),
            "ffn_remote": ffn_remote, "row_bytes": D * x.element_size(), "rows_sent": st.rows_sent,
            "rows_received": st.rows_received, "bytes_sent_remote": st.bytes_sent_remote,
            "recv_counts_PL": st.recv_counts_PL, "expected_recv_PL": [c[lo:lo + L].tolist() for c in counts_all],
            "null_slots": int((plan.null_idx_TK >= 0).sum()), "err": err}


def suite(num_ranks: int) -> dict:
    mcfg = EW.tiny_model_config()
    mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, null_kind="constant"))
    t0 = time.perf_counter()
    ctx = EW._ctx(2, mcfg.moe.num_experts, global_aux_loss=True)
    # ep 2: each of the context's ep groups (2 ranks) against a 2-rank reference; ep = world: one group of all
    views = {2: SimpleNamespace(world_size=2, rank=ctx.ep_rank, ep_size=2, ep_rank=ctx.ep_rank,
                                ep_group=ctx.ep_group), num_ranks: EW._ep_view(ctx, num_ranks)}
    t1 = time.perf_counter()
    cases = [dict(layer_case(view, kind, share, seed=10 * i + j), ep=ep) for ep, view in views.items()
             for i, kind in enumerate(KINDS) for j, share in enumerate(SHARES)]
    t2 = time.perf_counter()
    model = EW.model_checks(ctx, mcfg)
    seconds = {"init": t1 - t0, "layers": t2 - t1, "model": time.perf_counter() - t2}
    name = "layers.0.moe.router.null_values"
    return {"cases": cases, "seconds": seconds, "model": {
        "null_values_is_dtensor": model["types"] == ["DTensor"] and name in model["grad_err"],
        "loss_err": model["loss_err"], "grad_err": model["grad_err"], "grad_scale": model["grad_scale"],
        "null_values_grad_scale": model["grad_scale"][name]}}
