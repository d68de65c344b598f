"""Rank-side code of the expert-parallel tests: spawned with torch.multiprocessing (gloo, CPU, 1 thread per rank).

Each worker measures and returns plain numbers (max errors, row counts) that the pytest side asserts on, so a
failure reads as a normal assertion. References are single-process and computed inside each rank from the same
seeds: the full (unsharded) layer or model on the concatenation of every rank's tokens.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import traceback

import torch
import torch.distributed as dist

from moe_train.config import ModelConfig, MoEConfig, ParallelConfig
from moe_train.model.moe_layer import LocalDispatcher, MoELayer

D, FF, T_LOCAL = 16, 24, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn_name, world: int, out_dir, **kwargs) -> list:
    """Runs ``fn_name(**kwargs)`` on ``world`` gloo ranks; returns each rank's result. ``fn_name``: a function of
    this module by name, or a module-level function of another test module (pickled by reference)."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_entry, args=(world, port, fn_name, kwargs, str(out_dir)), nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _entry(rank, world, port, fn_name, kwargs, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = (globals()[fn_name] if isinstance(fn_name, str) else fn_name)(**kwargs)
    except Exception:
        traceback.print_exc()
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # every rank done with its last collective before any closes its connections
        dist.destroy_process_group()


def _ctx(ep: int, num_experts: int, **kw):
    from moe_train.parallel.distributed import init_distributed

    return init_distributed(ParallelConfig(ep=ep, rendezvous_timeout_s=30, **kw), num_experts)


def _maxerr(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _relerr(a, b) -> float:
    """_maxerr over the reference's largest entry when that exceeds 1 (fp32 results of different GEMM shapes and CPU
    kernels: rounding grows with the magnitude; router gradients reach ~20 here)."""
    return _maxerr(a, b) / (1.0 if b is None or b.numel() == 0 else max(1.0, b.detach().abs().max().item()))


# ----------------------------------------------------------------------------------------------------------
# one MoE layer: EP vs single process


LAYER_CASES = {
    "topk": dict(router="topk", top_k=2),
    "topk_zero_rank": dict(router="topk", top_k=2),  # the last ep rank's experts are never picked
    "null_all_null_tokens": dict(router="null_experts", num_null_experts=4, top_k=3),  # some tokens pick only nulls
    "adak_k0": dict(router="adak", k_min=0, k_max=3),  # greedy k in 0..3: some tokens use no expert
    "top_p": dict(router="top_p", top_p=0.5),  # the smallest set reaching p: k varies per token (tests/test_top_p.py)
}


def _make_layer(case: str, num_experts: int, ep: int, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    moe = dict(LAYER_CASES[case], num_experts=num_experts)
    layer = MoELayer(ModelConfig(hidden_size=D, intermediate_size=FF, moe=MoEConfig(**moe)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        r = layer.router
        if case == "topk_zero_rank":  # feature 0 is a constant 1: the last rank's experts score -20
            L = num_experts // ep
            r.gate.weight[num_experts - L:] = 0
            r.gate.weight[num_experts - L:, 0] = -20
        if case == "null_all_null_tokens":  # tokens with feature 1 = 5 score +50 on every null expert
            r.null_gate.weight[:, 1] = 10
    return layer


def _make_x(case: str, world: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * T_LOCAL, D, generator=g)
    x[:, 0] = 1.0
    x[:, 1] = 0.0
    if case == "null_all_null_tokens":
        x[::3, 1] = 5.0  # every third token of every rank
    return x


def _layer_case(ctx, case: str, num_experts: int) -> dict:
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts

    world, rank, ep = ctx.world_size, ctx.rank, ctx.ep_size
    assert ep == world, "the layer reference covers every rank's tokens: one ep group over the world"
    ref = _make_layer(case, num_experts, ep)
    x_full = _make_x(case, world)
    proj = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(2))
    # Reference: one process, all experts, every rank's tokens; loss = sum over all tokens of y . proj.
    xr = x_full.clone().requires_grad_(True)
    y_ref, _ = ref(xr[None])
    (y_ref[0] * proj).sum().backward()

    layer = copy.deepcopy(ref)
    layer.zero_grad(set_to_none=True)
    shard_experts(layer.experts, ctx.ep_rank, ep)
    layer.dispatcher = AllToAllDispatcher(ctx.ep_group, num_experts)
    sl = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    x = x_full[sl].clone().requires_grad_(True)
    y, plan = layer(x[None])
    (y[0] * proj[sl]).sum().backward()  # summed over ranks: the reference loss

    L, lo = num_experts // ep, ctx.ep_rank * (num_experts // ep)
    out = {"y": _relerr(y[0], y_ref[0, sl]), "x_grad": _relerr(x.grad, xr.grad[sl])}
    for name, p in layer.named_parameters():
        p_ref = dict(ref.named_parameters())[name]
        if name.startswith("experts."):
            out[f"grad:{name}"] = _relerr(p.grad, None if p_ref.grad is None else p_ref.grad[lo:lo + L])
        else:
            g = p.grad
            if g is not None:
                g = g.clone()
                dist.all_reduce(g, group=ctx.ep_group)
            out[f"grad:{name}"] = _relerr(g, p_ref.grad)
    st = layer.dispatcher.last
    true_local = int((plan.expert_idx_TK >= 0).sum())
    all_null_tokens = int(((plan.expert_idx_TK >= 0).sum(1) == 0).sum())
    return {"err": out, "rows_sent": st.rows_sent, "rows_received": st.rows_received, "true_local": true_local,
            "all_null_tokens": all_null_tokens, "recv_counts_PL": st.recv_counts_PL}


def _plan_with_null_fraction(layer: MoELayer, x_TD: torch.Tensor, frac: float, seed: int):
    """The router's top-k plan with exactly round(frac * T*K) slots turned null (weights renormalised)."""
    from moe_train.routing.topk import renormalize

    plan = layer.router(x_TD)
    S = plan.expert_idx_TK.numel()
    g = torch.Generator().manual_seed(seed)
    null_S = torch.zeros(S, dtype=torch.bool)
    null_S[torch.randperm(S, generator=g)[:round(frac * S)]] = True
    keep = ~null_S.view_as(plan.expert_idx_TK)
    plan.expert_idx_TK = torch.where(keep, plan.expert_idx_TK, -1)
    plan.weight_TK = renormalize(plan.weight_TK, keep)
    plan.counts_E = torch.bincount(plan.expert_idx_TK[keep], minlength=plan.counts_E.numel())
    return plan


def _rows_and_capacity(ctx, num_experts: int) -> dict:
    """Row accounting at null fractions 0 / 25 / 50 %, and capacity under EP, against a full-expert local run."""
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts
    from moe_train.routing.capacity import apply_capacity

    ep, rank = ctx.ep_size, ctx.rank
    full = _make_layer("topk", num_experts, ep)
    layer = copy.deepcopy(full)
    shard_experts(layer.experts, ctx.ep_rank, ep)
    disp = AllToAllDispatcher(ctx.ep_group, num_experts)
    x = _make_x("topk", ctx.world_size)[rank * T_LOCAL:(rank + 1) * T_LOCAL]
    res = {"null": [], "capacity": []}
    for i, frac in enumerate((0.0, 0.25, 0.5)):
        with torch.no_grad():
            plan = _plan_with_null_fraction(full, x, frac, seed=10 * rank + i)
            y = disp(x, plan, layer.experts)
            y_ref = LocalDispatcher()(x, plan, full.experts)
        counts_all = [torch.zeros_like(plan.counts_E) for _ in range(ep)]
        dist.all_gather(counts_all, plan.counts_E, group=ctx.ep_group)
        L, lo = num_experts // ep, ctx.ep_rank * (num_experts // ep)
        expected_recv = [c[lo:lo + L].tolist() for c in counts_all]
        st = disp.last
        res["null"].append({"frac": frac, "slots": plan.expert_idx_TK.numel(),
                            "true_local": int((plan.expert_idx_TK >= 0).sum()), "rows_sent": st.rows_sent,
                            "rows_received": st.rows_received, "recv_counts_PL": st.recv_counts_PL,
                            "expected_recv_PL": expected_recv, "y_err": _maxerr(y, y_ref),
                            "bytes_sent_remote": st.bytes_sent_remote, "rows_sent_remote": st.rows_sent_remote})
    for policy in ("weight", "position"):
        with torch.no_grad():
            plan = apply_capacity(full.router(x), 1.0, policy)
            y = disp(x, plan, layer.experts)
            y_ref = LocalDispatcher()(x, plan, full.experts)
        caps = [torch.zeros_like(plan.extras["capacity"]["capacity"]) for _ in range(ep)]
        dist.all_gather(caps, plan.extras["capacity"]["capacity"], group=ctx.ep_group)
        res["capacity"].append({"policy": policy, "capacity_per_source": [int(c) for c in caps],
                                "recv_counts_PL": disp.last.recv_counts_PL, "y_err": _maxerr(y, y_ref),
                                "num_dropped": int(plan.extras["capacity"]["num_dropped"])})
    return res


def _ep_view(ctx, ep: int):
    """The context's ep groups, or (ep == world) one ep group over every rank."""
    from types import SimpleNamespace

    if ep == ctx.ep_size:
        return ctx
    assert ep == ctx.world_size, (ep, ctx.world_size)
    return SimpleNamespace(world_size=ctx.world_size, rank=ctx.rank, ep_size=ep, ep_rank=ctx.rank,
                           ep_group=dist.group.WORLD)


def layer_checks(ctx, ep: int, num_experts: int, cases: list[str]) -> dict:
    view = _ep_view(ctx, ep)
    out = {"cases": {c: _layer_case(view, c, num_experts) for c in cases}}
    out["rows"] = _rows_and_capacity(view, num_experts)
    return out


# ----------------------------------------------------------------------------------------------------------
# whole model: FSDP2 gradient reduction vs single process on the global batch


def tiny_model_config(router: str = "null_experts") -> ModelConfig:
    moe = MoEConfig(router=router, num_experts=4, top_k=3 if router == "null_experts" else 2,
                    num_null_experts=4 if router == "null_experts" else 0, aux_loss_coef=0.01)
    return ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                       num_kv_heads=1, max_seq_len=16, moe=moe)


def _global_batch(world: int, per_rank: int = 2, seq: int = 8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (world * per_rank, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def model_checks(ctx, mcfg: ModelConfig) -> dict:
    from moe_train.model import build_model
    from moe_train.model.loss import lm_loss, routing_losses
    from moe_train.parallel.collectives import clip_grad_norm_
    from moe_train.parallel.parallelize import parallelize_model
    from moe_train.parallel.state import full_grads, full_state_dict

    torch.manual_seed(0)
    ref = build_model(mcfg)
    model = copy.deepcopy(ref)
    inputs, targets = _global_batch(ctx.world_size)
    # Reference: the global batch in one process, mean loss.
    logits, plans = ref(inputs, return_plans=True)
    loss_ref = lm_loss(logits, targets) + routing_losses(plans, mcfg.moe)["aux_loss"]
    loss_ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e-3)  # clips: compare clipped grads too

    model = parallelize_model(model, ctx)
    per = inputs.shape[0] // ctx.world_size
    sl = slice(ctx.rank * per, (ctx.rank + 1) * per)
    logits, plans = model(inputs[sl], return_plans=True)
    loss = lm_loss(logits, targets[sl]) + routing_losses(plans, mcfg.moe)["aux_loss"]
    loss.backward()
    loss_mean = loss.detach().clone()
    dist.all_reduce(loss_mean)
    grads = full_grads(model, ctx)
    norm = clip_grad_norm_(model.parameters(), 1e-3, ctx)
    clipped = full_grads(model, ctx)
    sd = full_state_dict(model, ctx)
    return {
        "norm": norm.item(), "ref_norm": ref_norm.item(),
        "full_norm": torch.sqrt(sum(g.double().square().sum() for g in grads.values() if g is not None)).item(),
        "clipped_err": {n: _maxerr(clipped[n], p.grad) / 1e-3 for n, p in ref.named_parameters()},
        "loss_err": abs(loss_mean.item() / ctx.world_size - loss_ref.item()),
        "norm_err": abs(norm.item() - ref_norm.item()),
        "grad_err": {n: _maxerr(grads[n], ref_grads[n]) for n in ref_grads},
        "grad_scale": {n: ref_grads[n].abs().max().item() for n in ref_grads},
        "grad_ratio": {n: ((grads[n].double() * ref_grads[n].double()).sum()
                           / ref_grads[n].double().square().sum().clamp_min(1e-300)).item()
                       for n in ref_grads if ref_grads[n].abs().max() > 1e-8},
        "state_err": {n: _maxerr(sd[n], v) for n, v in ref.state_dict().items()},
        "state_keys_equal": list(sd) == list(ref.state_dict()),
        "types": sorted({type(p).__name__ for p in model.parameters()}),
    }


def suite(ep: int, layer_runs: list[dict]) -> dict:
    """One spawn, several checks: the layer runs (ep, num_experts, cases), then the model check with the
    context's own layout (ep, dp = world/ep, global aux loss on)."""
    mcfg = tiny_model_config()
    ctx = _ctx(ep, mcfg.moe.num_experts, global_aux_loss=True)
    out = {"layout": {"rank": ctx.rank, "ep_rank": ctx.ep_rank, "edp_rank": ctx.edp_rank,
                      "ep_ranks": dist.get_process_group_ranks(ctx.ep_group),
                      "edp_ranks": dist.get_process_group_ranks(ctx.edp_group),
                      "mesh_shape": tuple(ctx.mesh.shape), "mesh_dims": ctx.mesh.mesh_dim_names}}
    out["layers"] = [dict(run, **layer_checks(ctx, **run)) for run in layer_runs]
    out["model"] = model_checks(ctx, mcfg)
    return out


# ----------------------------------------------------------------------------------------------------------
# the trainer on several ranks


def train_run(cfg_dict: dict) -> dict:
    from moe_train.config import Config, from_dict, validate
    from moe_train.train.trainer import train

    cfg = from_dict(Config, copy.deepcopy(cfg_dict))
    validate(cfg)
    record = train(cfg)
    return {"record": record, "initialized_after": dist.is_initialized()}


# ----------------------------------------------------------------------------------------------------------
# mixed precision: the trainer under FSDP2, recording the dtypes that reach the kernels and the collectives


def precision_runs(cfg_dicts: list[dict]) -> dict:
    """One trainer run per config on one process group, keyed by train.precision. Records the operand dtypes of
    torch._grouped_mm (the expert GEMMs at these sizes), whether autocast was on there, the dtypes of FSDP's
    all-gathers / reduce-scatters and of the dispatcher's row all-to-alls, and the parameter, gradient and
    optimizer-state dtypes after the last step."""
    from torch.distributed.fsdp import FSDPModule

    from moe_train.config import Config, from_dict, validate
    from moe_train.parallel import exchange
    from moe_train.parallel.distributed import init_distributed
    from moe_train.train import trainer as trainer_mod

    cfgs = [from_dict(Config, copy.deepcopy(c)) for c in cfg_dicts]
    for c in cfgs:
        validate(c)
    ctx = init_distributed(cfgs[0].parallel, cfgs[0].model.moe.num_experts)
    real = {"gmm": torch._grouped_mm, "ag": dist.all_gather_single, "rs": dist.reduce_scatter_single,
            "a2a": exchange.all_to_all_start, "opt": trainer_mod.build_optimizer}
    out = {}
    for cfg in cfgs:
        seen: dict = {k: set() for k in ("gemm", "autocast", "ag", "rs", "a2a")}
        held: dict = {}

        def floats(*ts):
            return {str(t.dtype) for t in ts if isinstance(t, torch.Tensor) and t.is_floating_point()}

        def gmm(x, w, *a, **kw):
            seen["gemm"] |= floats(x, w)
            seen["autocast"].add(torch.is_autocast_enabled(x.device.type))
            return real["gmm"](x, w, *a, **kw)

        def ag(output_tensor, input_tensor, *a, **kw):
            seen["ag"] |= floats(input_tensor)
            return real["ag"](output_tensor, input_tensor, *a, **kw)

        def rs(output, input, *a, **kw):
            seen["rs"] |= floats(input)
            return real["rs"](output, input, *a, **kw)

        def a2a(inp, *a, **kw):  # every exchange of the dispatcher (parallel/exchange.py): the rows' dtype
            seen["a2a"] |= floats(inp)
            return real["a2a"](inp, *a, **kw)

        def spy(model, cfg_, device):
            held["model"], held["opt"] = model, real["opt"](model, cfg_, device)
            return held["opt"]

        torch._grouped_mm, dist.all_gather_single, dist.reduce_scatter_single = gmm, ag, rs
        exchange.all_to_all_start, trainer_mod.build_optimizer = a2a, spy
        try:
            trainer_mod.train(cfg, ctx)
        finally:
            torch._grouped_mm, dist.all_gather_single, dist.reduce_scatter_single = real["gmm"], real["ag"], real["rs"]
            exchange.all_to_all_start, trainer_mod.build_optimizer = real["a2a"], real["opt"]
        model, opt = held["model"], held["opt"]
        params = [p for p in model.parameters() if p.requires_grad]
        out[cfg.train.precision] = {
            "fsdp": isinstance(model, FSDPModule),
            "param_dtypes": sorted(floats(*params)),
            "grad_dtypes": sorted(floats(*(p.grad for p in params))),
            "optim_state_dtypes": sorted(floats(*(v for s in opt.state.values() for k, v in s.items() if k != "step"))),
            "gemm_dtypes": sorted(seen["gemm"]), "autocast_in_gemm": any(seen["autocast"]),
            "all_gather_dtypes": sorted(seen["ag"]), "reduce_scatter_dtypes": sorted(seen["rs"]),
            "all_to_all_row_dtypes": sorted(seen["a2a"]),
        }
    return out
