"""Helpers of tests/test_megatron.py: small Megatron-Core MoE layers on CPU, and the 2-rank (gloo) worker.

Test-only patches of Megatron-Core's CUDA-only calls (``cpu_patches``): 0.16.1 references te_general_gemm without
Transformer Engine, and its TopKRouter moves its weight to torch.cuda.current_device(). Our router and
dispatcher need neither; Megatron's own TopKRouter (the reference) does.
Shape legend: S sequence, B micro-batch, D hidden, E true experts, L local experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

D, FF = 16, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_patches(monkeypatch=None):
    """Megatron-Core's CUDA-only calls made CPU-safe (tests only)."""
    import megatron.core.transformer.moe.moe_utils as mu
    import pytest

    mp = monkeypatch or pytest.MonkeyPatch()
    mp.setattr(mu, "te_general_gemm", None, raising=False)
    mp.setattr(torch.cuda, "current_device", lambda: "cpu")
    try:
        yield
    finally:
        if monkeypatch is None:
            mp.undo()


def pg_collection(ep_group, single_group):
    """Process groups of a layer whose ep group is ``ep_group``; every other parallel dim has size 1."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    s = single_group
    return ProcessGroupCollection(tp=s, cp=s, tp_cp=s, expt_tp=s, expt_dp=s, pp=s, ep=ep_group, tp_ep=ep_group,
                                  dp=ep_group, tp_dp_cp=ep_group)


def make_config(num_experts: int = 4, topk: int = 2, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=D, num_attention_heads=2, num_moe_experts=num_experts,
                moe_router_topk=topk, moe_ffn_hidden_size=FF, ffn_hidden_size=FF, gated_linear_unit=True,
                activation_func=F.silu, add_bias_linear=False, moe_token_dispatcher_type="allgather",
                use_cpu_initialization=True, params_dtype=torch.float32, bf16=False,
                moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    base.update(kw)
    return TransformerConfig(**base)


def moe_submodules(router=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from moe_train.parallel.megatron import compat

    _, subs = compat.moe_spec_parts(get_gpt_layer_local_spec(num_experts=4).submodules.mlp)  # 0.16.1 and 0.19 forms
    return subs if router is None else dataclasses.replace(subs, router=router)


def build_layer(config, pg, router=None, ours: bool = False):
    """Megatron's MoELayer (its configured dispatcher) or, with ours=True, VariableKMoELayer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from moe_train.parallel.megatron import VariableKMoELayer

    cls = VariableKMoELayer if ours else MoELayer
    layer = cls(config, moe_submodules(router), layer_number=1, pg_collection=pg)
    layer.set_layer_number(1)
    return layer


def set_params(layer, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def maxerr(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def relerr(a, b) -> float:
    """maxerr over the reference's largest entry when that exceeds 1: fp32 results of different GEMM shapes and CPU
    kernels, whose rounding grows with the magnitude (gradients reach ~20 here)."""
    return maxerr(a, b) / (1.0 if b is None or b.numel() == 0 else max(1.0, b.detach().abs().max().item()))


# ----------------------------------------------------------------------------------------------------------
# 2 ranks: VariableKMoELayer at ep=2 vs the single-rank layer (Megatron's allgather dispatcher, ep=1)

EP_CASES = {
    # name: (routing kwargs, tokens per rank, tweak)
    "topk_zero_rank": (dict(method="topk"), [12, 12]),  # rank 1's experts are never picked: it receives 0 rows
    "null_all_null": (dict(method="null_experts", num_null_experts=4, top_k=3), [12, 12]),  # some tokens pick only nulls
    "adak_k0": (dict(method="adak", k_min=0, k_max=3), [12, 12]),  # greedy k in 0..3: some tokens use no expert
    "null_empty_rank": (dict(method="null_experts", num_null_experts=4, top_k=3), [12, 0]),  # rank 1 has no tokens at all
}


def _tweak(layer, case: str, num_experts: int, ep: int) -> None:
    r = layer.router
    with torch.no_grad():
        if case == "topk_zero_rank":  # feature 0 is a constant 1: the last rank's experts score -20
            L = num_experts // ep
            r.weight[num_experts - L:] = 0
            r.weight[num_experts - L:, 0] = -20
        if case.startswith("null"):  # tokens with feature 1 = 5 score +50 on every null expert
            r.null_weight[:, 1] = 10
        if case == "adak_k0":  # tokens with feature 1 = 5 choose k = 0
            r.allocator_weight[:, 1] = 0
            r.allocator_weight[0, 1] = 10


def _inputs(case: str, tokens: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(tokens), 1, D, generator=g)
    x[..., 0] = 1.0
    x[..., 1] = 0.0
    x[::3, :, 1] = 5.0
    proj = torch.randn(x.shape, generator=g)
    return x, proj


def ep_case(case: str, rank: int, world: int, pg_ep, pg_single) -> dict:
    from moe_train.parallel.megatron import VariableKRouter, VariableKRouting

    kwargs, tokens = EP_CASES[case]
    E = 4
    cfg = make_config(num_experts=E, topk=kwargs.get("top_k", 2))
    routing = VariableKRouting(**kwargs)
    ref = build_layer(cfg, pg_single, VariableKRouter.builder(dataclasses.replace(routing, dispatcher="megatron")))
    set_params(ref)
    _tweak(ref, case, E, world)
    x_full, proj = _inputs(case, tokens)
    xr = x_full.clone().requires_grad_(True)
    y_ref, _ = ref(xr)
    (y_ref * proj).sum().backward()

    layer = build_layer(cfg, pg_ep, VariableKRouter.builder(routing), ours=True)
    L = layer.num_local_experts
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("experts.local_experts."):
                i = int(name.split(".")[2])
                src = name.replace(f"local_experts.{i}.", f"local_experts.{rank * L + i}.", 1)
                p.copy_(ref_params[src])
            else:
                p.copy_(ref_params[name])
    lo = sum(tokens[:rank])
    sl = slice(lo, lo + tokens[rank])
    x = x_full[sl].clone().requires_grad_(True)
    y, _ = layer(x)
    (y * proj[sl]).sum().backward()  # summed over ranks: the reference loss

    err = {"y": relerr(y, y_ref[sl]), "x_grad": relerr(x.grad, xr.grad[sl])}
    for name, p in layer.named_parameters():
        if name.startswith("experts.local_experts."):
            i = int(name.split(".")[2])
            src = name.replace(f"local_experts.{i}.", f"local_experts.{rank * L + i}.", 1)
            err[f"grad:{name}"] = relerr(p.grad, ref_params[src].grad)
        else:  # the router sees only this rank's tokens: its gradient sums over ranks
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()  # None on a rank with no tokens
            dist.all_reduce(g)
            g_ref = ref_params[name].grad
            err[f"grad:{name}"] = relerr(g, torch.zeros_like(p) if g_ref is None else g_ref)
    st = layer.token_dispatcher.last
    plan = layer.router.last_plan
    true_TK = plan.expert_idx_TK >= 0
    return {"err": err, "rows_sent": st.rows_sent, "rows_received": st.rows_received,
            "true_local": int(true_TK.sum()), "slots": plan.expert_idx_TK.numel(),
            "no_expert_tokens": int((true_TK.sum(1) == 0).sum()), "tokens": tokens[rank],
            "recv_counts_PL": st.recv_counts_PL}


def ep_suite() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    pg_ep = pg_collection(dist.group.WORLD, singles[rank])
    pg_single = pg_collection(singles[rank], singles[rank])
    with cpu_patches():
        return {case: ep_case(case, rank, world, pg_ep, pg_single) for case in EP_CASES}


def spawn(fn_name: str, world: int, out_dir) -> list:
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_entry, args=(world, port, fn_name, str(out_dir)), nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank, world, port, fn_name, out_dir):
    import warnings

    warnings.filterwarnings("ignore")  # Megatron-Core warns about missing Transformer Engine / Apex on import
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = globals()[fn_name]()
    except Exception:
        traceback.print_exc()
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
