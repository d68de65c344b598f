"""All-to-all overlap (parallel/overlap.py, parallel.a2a_overlap_chunks) on 2 gloo ranks, one spawn.

Reference: the plain AllToAllDispatcher (itself checked against a single process in tests/test_ep_parallel.py) on
the same layer, tokens and loss. Chunked, the same rows are exchanged in pieces and the experts run per chunk, so
outputs and every gradient (input, router, expert shards) must agree to 1e-6 in fp32 (relative to the largest entry
when that exceeds 1: an expert weight gradient sums its rows in C GEMMs instead of one). Cases: top-k with 2 local
experts, 1 local expert, null experts with all-null tokens, a rank whose experts receive nothing, more chunks than
rows of some blocks; overlap on for C = 2 and 7. Also: the chunk cut and the reordered permutation (no spawn), the
config check, and CommTimer seeing exchange time (chunked and plain).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_train.config import Config, ConfigError, ParallelConfig, validate
from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.parallel.overlap import chunk_order, reorder_permutation

import ep_workers as W

CASES = [("topk", 4), ("topk", 2), ("null_all_null_tokens", 4), ("topk_zero_rank", 4)]
CHUNKS = (2, 7)


def overlap_worker() -> dict:
    import torch.distributed as dist

    from moe_train.parallel.dispatcher import AllToAllDispatcher
    from moe_train.parallel.overlap import CommTimer
    from moe_train.parallel.parallelize import shard_experts

    ctx = W._ctx(2, 4, a2a_overlap_chunks=3)
    out = {"ctx_chunks": ctx.a2a_overlap_chunks}  # the config key reaches the context parallelize_model reads
    for case, E in CASES:
        base = W._make_layer(case, E, 2)
        shard_experts(base.experts, ctx.ep_rank, 2)
        x_full = W._make_x(case, 2)
        x_loc = x_full[ctx.rank * W.T_LOCAL:(ctx.rank + 1) * W.T_LOCAL]
        proj = torch.randn(x_loc.shape, generator=torch.Generator().manual_seed(3 + ctx.rank))
        results = {}
        for C in (1,) + CHUNKS:
            layer = copy.deepcopy(base)
            layer.dispatcher = AllToAllDispatcher(ctx.ep_group, E, overlap_chunks=C)
            x = x_loc.clone().requires_grad_(True)
            with CommTimer.measure() as timer:
                y, _ = layer(x[None])
                (y[0] * proj).sum().backward()
            results[C] = {"y": y.detach(), "x": x.grad, "comm_s": timer.seconds,
                          **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
        ref = results[1]
        out[f"{case}/E{E}"] = {C: {"err": {k: W._relerr(v, ref[k]) for k, v in r.items() if k != "comm_s"},
                                   "keys": sorted(r), "comm_s": r["comm_s"]}
                               for C, r in results.items() if C != 1}
        out[f"{case}/E{E}"]["plain_comm_s"] = ref["comm_s"]
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return W.spawn(overlap_worker, 2, tmp_path_factory.mktemp("overlap"))


def test_overlap_equals_plain_path_forward_and_backward(ranks):
    for rank, res in enumerate(ranks):
        assert res.pop("ctx_chunks") == 3
        for case, by_c in res.items():
            for C in CHUNKS:
                r = by_c[C]
                assert {"y", "x"} <= set(r["keys"]) and any(k.startswith("experts.") for k in r["keys"])
                assert any(k.startswith("router.") for k in r["keys"]), r["keys"]
                bad = {k: v for k, v in r["err"].items() if not v <= 1e-6}
                assert not bad, f"rank {rank} {case} C={C}: {bad}"


def test_comm_timer_sees_the_exchanges(ranks):
    for res in ranks:
        for by_c in (v for k, v in res.items() if k != "ctx_chunks"):
            assert by_c[2]["comm_s"] > 0  # issue + wait of the async exchanges, forward and backward
            assert by_c["plain_comm_s"] > 0  # the plain path's start / wait too


def test_chunk_order_and_reordered_permutation():
    """The chunk cut against a plain-python listing, and a reordered permutation giving the same combine."""
    counts = [5, 0, 3, 1]
    order, parts = chunk_order(counts, 3, torch.device("cpu"))
    starts = [0, 5, 5, 8]
    expect = [starts[e] + i for c in range(3) for e in range(4) for i in range(counts[e] * c // 3,
                                                                               counts[e] * (c + 1) // 3)]
    assert order.tolist() == expect and [sum(p) for p in parts] == [2, 3, 4]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 4, (11, 3), generator=g)
    w = torch.rand(11, 3, generator=g, dtype=torch.float64) * (idx >= 0)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    perm = build_permutation(idx, 4)
    order, _ = chunk_order(perm.counts_E.tolist(), 3, torch.device("cpu"))
    perm2 = reorder_permutation(perm, order)
    x_ND = permute(x, perm2)
    assert torch.equal(x_ND, permute(x, perm)[order])
    torch.testing.assert_close(unpermute_combine(torch.tanh(x_ND), perm2, w, 11),
                               unpermute_combine(torch.tanh(permute(x, perm)), perm, w, 11), rtol=0, atol=1e-15)


def test_chunk_order_on_device_counts_equals_host_lists():
    counts = [5, 0, 3, 1, 7, 2]
    for C in (2, 3, 7):
        want, parts = chunk_order(counts, C, torch.device("cpu"))
        got, parts2 = chunk_order(counts, C, torch.device("cpu"), torch.tensor(counts, dtype=torch.int32))
        assert torch.equal(got, want) and parts2 == parts


def test_overlapped_layer_builds_no_device_tensor_from_host_lists(monkeypatch):
    """Per chunk, a tensor built from a Python list is a host-to-device copy that waits for the GPU: the chunk
    counts must come from the exchanged counts on device. One process stands in for 2 ep ranks: the exchange is
    replaced by a local copy (rank 0 receives from each rank what it sends there: symmetric counts)."""
    from moe_train.parallel import exchange, overlap
    from moe_train.parallel.exchange import CountExchange

    def local_a2a(inp, out_splits, in_splits, group=None):
        assert out_splits == in_splits
        return inp.clone()

    P, L, C = 2, 2, 3
    send_E = [4, 0, 5, 2]  # to (rank 0: experts 0, 1), (rank 1: experts 2, 3); symmetric: received the same
    recv_dev_PL = torch.tensor(send_E).view(P, L)
    counts_dev_E = torch.tensor(send_E)
    ex = CountExchange(group=None, ep_rank=0, send_counts_E=send_E, recv_counts_PL=[send_E[:2], send_E[2:]],
                       send_P=[4, 7], recv_P=[4, 7], recv_counts_dev_PL=recv_dev_PL)
    x = torch.randn(sum(send_E), 3, requires_grad=True)
    seen_counts = []

    def experts(x_RD, counts_L):
        seen_counts.append(counts_L.tolist())
        return 2 * x_RD

    built = []
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def counting(real):
        def fn(data, *args, **kwargs):
            if isinstance(data, (list, tuple)):
                built.append(data)
            return real(data, *args, **kwargs)
        return fn

    monkeypatch.setattr(exchange, "all_to_all_start", local_a2a)
    monkeypatch.setattr(exchange, "wait_tensor", lambda t: t)
    monkeypatch.setattr(torch, "tensor", counting(real_tensor))
    monkeypatch.setattr(torch, "as_tensor", counting(real_as_tensor))
    order_N, _ = chunk_order(send_E, C, x.device, counts_dev_E)
    pipe = overlap.ChunkPipeline(ex, C)
    pipe.start(x[order_N])
    overlap.overlapped_experts(pipe, experts)
    y = pipe.finish()
    y.sum().backward()
    monkeypatch.undo()
    assert built == []
    want = [[sum(n * (c + 1) // C - n * c // C for n in send_E[l::L]) for l in range(L)] for c in range(C)]
    assert seen_counts == want
    torch.testing.assert_close(y, 2 * x.detach()[order_N])
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_config_rejects_bad_chunk_counts(bad):
    cfg = Config(parallel=ParallelConfig(a2a_overlap_chunks=bad))
    with pytest.raises(ConfigError, match="a2a_overlap_chunks"):
        validate(cfg)
