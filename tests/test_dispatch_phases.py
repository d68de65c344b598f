"""The dispatcher's phases (route -> dispatch -> experts -> combine, parallel/dispatcher.py) with a shared expert and
the identity / constant null term, on 2 gloo ranks (one spawn for moe_train's layer, one for Megatron's).

Reference: the single-process layer (LocalDispatcher, or Megatron's allgather dispatcher at ep = 1) on every rank's
tokens; the expert-parallel layer computes the shared expert while the dispatch exchange is in flight and the null
term while the combine exchange is, plain (C = 1) and chunked (a2a_overlap_chunks C = 3). Output and every gradient
(input, router, null values, shared expert and gate, expert shards) must agree to 1e-5 in fp32 (relative to the
largest entry when that exceeds 1, as tests/test_ep_parallel.py). The order is checked too, from a log of the
exchange starts / waits and the terms' calls: forward, the shared expert between the dispatch's start and its wait
and the null term between the combine's start and its wait; backward, the shared expert's backward while the
reverse of the dispatch is in flight. Also: one CountExchange host read per layer call (.tolist()).
"""

from __future__ import annotations

import copy

import pytest
import torch

import ep_workers as W

TOL = 1e-5
CASES = {  # name: (MoEConfig fields, ModelConfig fields)
    "gated_shared_identity": (dict(router="null_experts", num_null_experts=4, top_k=3, null_kind="identity"),
                              dict(shared_expert_intermediate_size=20)),
    "deepseek_shared_constant": (dict(router="null_experts", num_null_experts=4, top_k=3, null_kind="constant"),
                                 dict(n_shared_experts=1)),
    "both_shared_topk": (dict(router="topk", top_k=2), dict(shared_expert_intermediate_size=20, n_shared_experts=1)),
}
CHUNKS = (1, 3)
E = 4


def _layer(case: str):
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer

    moe, model = CASES[case]
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=W.D, intermediate_size=W.FF, moe=MoEConfig(num_experts=E, **moe),
                                 **model))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


class _Log:
    """Records exchange starts / waits (parallel/exchange.py's calls) and the layer's shared / null terms."""

    def __init__(self, layer):
        from moe_train.model import moe_layer
        from moe_train.parallel import exchange

        self.events: list[str] = []
        self.real = (exchange.all_to_all_start, exchange.wait_tensor, moe_layer.null_expert_output)
        start, wait, null = self.real

        def log(name, fn):
            def wrapped(*a, **kw):
                self.events.append(name)
                return fn(*a, **kw)
            return wrapped

        exchange.all_to_all_start, exchange.wait_tensor = log("start", start), log("wait", wait)
        moe_layer.null_expert_output = log("null", null)
        for mod in (layer.shared_expert, layer.shared_experts):
            if mod is not None:
                mod.register_forward_hook(lambda *_: self.events.append("shared"))
                mod.register_full_backward_hook(lambda *_: self.events.append("shared_bw"))

    def close(self):
        from moe_train.model import moe_layer
        from moe_train.parallel import exchange

        exchange.all_to_all_start, exchange.wait_tensor, moe_layer.null_expert_output = self.real


def native_worker() -> dict:
    import torch.distributed as dist

    from moe_train.parallel import exchange
    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.parallelize import shard_experts

    ctx = W._ctx(2, E)
    rank, L = ctx.rank, E // 2
    out = {}
    for case in CASES:
        ref = _layer(case)
        x_full = W._make_x("null_all_null_tokens", 2)
        proj = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(2))
        xr = x_full.clone().requires_grad_(True)
        y_ref, _ = ref(xr[None])
        (y_ref[0] * proj).sum().backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        sl = slice(rank * W.T_LOCAL, (rank + 1) * W.T_LOCAL)
        for C in CHUNKS:
            layer = copy.deepcopy(ref)
            layer.zero_grad(set_to_none=True)
            shard_experts(layer.experts, ctx.ep_rank, 2)
            layer.dispatcher = AllToAllDispatcher(ctx.ep_group, E, overlap_chunks=C)
            x = x_full[sl].clone().requires_grad_(True)
            log = _Log(layer)
            host_reads = [0]
            real_run = exchange.CountExchange.run.__func__

            def counted(cls, *a, **kw):
                host_reads[0] += 1
                return real_run(cls, *a, **kw)

            exchange.CountExchange.run = classmethod(counted)
            try:
                y, _ = layer(x[None])
                fwd = list(log.events)
                (y[0] * proj[sl]).sum().backward()
            finally:
                log.close()
                exchange.CountExchange.run = classmethod(real_run)
            err = {"y": W._relerr(y[0], y_ref[0, sl]), "x_grad": W._relerr(x.grad, xr.grad[sl])}
            for name, p in layer.named_parameters():
                if name.startswith("experts."):
                    err[f"grad:{name}"] = W._relerr(p.grad, ref_grads[name][rank * L:(rank + 1) * L])
                else:  # this rank's tokens only: the gradient sums over ranks
                    g = p.grad.clone()
                    dist.all_reduce(g, group=ctx.ep_group)
                    err[f"grad:{name}"] = W._relerr(g, ref_grads[name])
            out[f"{case}/C{C}"] = {"err": err, "fwd": fwd, "bwd": log.events[len(fwd):],
                                   "host_reads": host_reads[0]}
    dist.barrier()
    return out


def _between(events: list[str], what: str, start_i: int, wait_i: int) -> bool:
    """``what`` occurs after the start_i-th 'start' and before the wait_i-th 'wait' (0-based)."""
    starts = [i for i, e in enumerate(events) if e == "start"]
    waits = [i for i, e in enumerate(events) if e == "wait"]
    return any(starts[start_i] < i < waits[wait_i] for i, e in enumerate(events) if e == what)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return W.spawn(native_worker, 2, tmp_path_factory.mktemp("phases"))


def test_phased_layer_with_shared_and_null_terms_equals_single_process(native):
    for rank, res in enumerate(native):
        assert set(res) == {f"{c}/C{C}" for c in CASES for C in CHUNKS}
        for key, r in res.items():
            names = set(r["err"])
            assert any(n.startswith("grad:shared_expert") for n in names) or "deepseek" in key, names
            assert any(n.startswith("grad:experts.") for n in names) and "grad:router.gate.weight" in names, names
            if "constant" in key:
                assert "grad:router.null_values" in names, names
            bad = {k: v for k, v in r["err"].items() if not v <= TOL}
            assert not bad, f"rank {rank} {key}: errors above {TOL}: {bad}"


def test_shared_and_null_terms_run_while_the_exchanges_travel(native):
    for res in native:
        for key, r in res.items():
            fwd, bwd = r["fwd"], r["bwd"]
            assert r["host_reads"] == 1, key  # the count exchange: the layer's one host sync
            # exchange 0 is the count exchange (start, wait); exchange 1 the dispatch of (the first chunk of) rows
            assert fwd[:2] == ["start", "wait"], (key, fwd)
            assert _between(fwd, "shared", 1, 1), (key, fwd)
            if "topk" not in key:  # the null term: after the last combine start, before the combine waits
                last_start = max(i for i, e in enumerate(fwd) if e == "start")
                assert fwd.index("null") > last_start and "wait" in fwd[fwd.index("null"):], (key, fwd)
            if key.endswith("/C1"):
                assert fwd.count("start") == fwd.count("wait") == 3, (key, fwd)
                # backward: combine's reverse (start, wait), then the dispatch's reverse with the shared expert's
                # backward in flight between its start and its wait
                assert bwd.count("start") == bwd.count("wait") == 2, (key, bwd)
                assert _between(bwd, "shared_bw", 1, 1), (key, bwd)


# ----------------------------------------------------------------------------------------------------------
# Megatron: VariableKMoELayer with shared experts and an identity null router, ep = 2 vs ep = 1


def megatron_worker() -> dict:
    import dataclasses

    import torch.distributed as dist

    from moe_train.parallel.megatron import VariableKRouter, VariableKRouting, ZeroComputeMoELayer

    import megatron_workers as MW

    dist.init_process_group("gloo")  # ep_workers.spawn set RANK / WORLD_SIZE / MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    pg_ep = MW.pg_collection(dist.group.WORLD, singles[rank])
    pg_single = MW.pg_collection(singles[rank], singles[rank])
    out = {}
    with MW.cpu_patches():
        for kind in ("identity", "constant"):
            cfg = MW.make_config(num_experts=E, topk=3, moe_shared_expert_intermediate_size=12)
            routing = VariableKRouting(method="null_experts", num_null_experts=4, top_k=3, null_kind=kind)
            ref = ZeroComputeMoELayer(cfg, MW.moe_submodules(VariableKRouter.builder(
                dataclasses.replace(routing, dispatcher="megatron"))), layer_number=1, pg_collection=pg_single)
            ref.set_layer_number(1)  # Megatron's allgather dispatcher at ep = 1, plus the null term
            MW.set_params(ref)
            x_full, proj = MW._inputs("null_all_null", [12, 12])
            xr = x_full.clone().requires_grad_(True)
            y_ref, _ = ref(xr)
            (y_ref * proj).sum().backward()
            layer = MW.build_layer(cfg, pg_ep, VariableKRouter.builder(routing), ours=True)
            assert layer.shared_experts is not None
            L = layer.num_local_experts
            ref_params = dict(ref.named_parameters())

            def src(name):
                if not name.startswith("experts.local_experts."):
                    return name
                i = int(name.split(".")[2])
                return name.replace(f"local_experts.{i}.", f"local_experts.{rank * L + i}.", 1)

            with torch.no_grad():
                for name, p in layer.named_parameters():
                    p.copy_(ref_params[src(name)])
            order = []
            layer.shared_experts.register_forward_hook(lambda *_: order.append("shared"))
            real_wait = layer.token_dispatcher.dispatch_postprocess

            def wait_logged(*a):
                order.append("dispatch_wait")
                return real_wait(*a)

            layer.token_dispatcher.dispatch_postprocess = wait_logged
            sl = slice(rank * 12, (rank + 1) * 12)
            x = x_full[sl].clone().requires_grad_(True)
            y, _ = layer(x)
            (y * proj[sl]).sum().backward()
            err = {"y": MW.relerr(y, y_ref[sl]), "x_grad": MW.relerr(x.grad, xr.grad[sl])}
            for name, p in layer.named_parameters():
                g = p.grad.clone()
                if not name.startswith("experts.local_experts."):
                    dist.all_reduce(g)
                err[f"grad:{name}"] = MW.relerr(g, ref_params[src(name)].grad)
            out[kind] = {"err": err, "order": order}
    return out


def test_megatron_layer_shared_experts_and_null_term_at_ep2_equal_ep1(tmp_path):
    pytest.importorskip("megatron.core")
    for rank, res in enumerate(W.spawn(megatron_worker, 2, tmp_path)):
        for kind, r in res.items():
            assert r["order"] == ["shared", "dispatch_wait"], (rank, kind, r["order"])  # shared runs before the wait
            names = set(r["err"])
            assert any(n.startswith("grad:shared_experts.") for n in names), names
            if kind == "constant":
                assert "grad:router.null_values" in names, names
            bad = {k: v for k, v in r["err"].items() if not v <= TOL}
            assert not bad, f"rank {rank} {kind}: errors above {TOL}: {bad}"
