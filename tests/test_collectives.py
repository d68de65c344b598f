"""The one collective layer (moe_train/parallel/collectives.py) checks that tensors live on the process group's
device. NCCL refuses CPU tensors but gloo, which every CPU test runs, accepts them, so a CPU tensor in a
collective shows up only on a GPU machine; here a one-rank gloo group is told to expect another device (the
backend -> device map monkeypatched) to see what NCCL would refuse. Also: Ada-K's warm-start statistics are
reduced on ctx.device (they were built on the CPU, which failed every Ada-K run at its first step on GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_train.parallel import collectives as C
from moe_train.parallel.distributed import ParallelContext


@pytest.fixture
def world1():
    """A one-rank gloo default group in this process (no spawn), torn down afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _calls(t: torch.Tensor):
    return {"all_reduce": lambda: C.all_reduce(t),
            "all_gather": lambda: C.all_gather([torch.empty_like(t)], t),
            "broadcast": lambda: C.broadcast(t, src=0),
            "all_to_all_single": lambda: C.all_to_all_single(torch.empty_like(t), t, [t.shape[0]], [t.shape[0]]),
            "all_reduce_sum": lambda: C.all_reduce_sum(t, ParallelContext(world_size=2))}


def test_tensors_on_the_backends_device_pass(world1):
    t = torch.arange(4.0)
    for call in _calls(t).values():
        call()
    assert torch.equal(C.all_reduce_sum(t, ParallelContext(world_size=2)), t)  # one rank: the sum is itself


def test_a_tensor_off_the_backends_device_is_refused(world1, monkeypatch):
    monkeypatch.setitem(C.BACKEND_DEVICE, "gloo", "cuda")  # as NCCL: CUDA tensors only
    t = torch.arange(4.0)
    for call in _calls(t).values():
        with pytest.raises(C.CollectiveDeviceError, match=r"gloo process group got a cpu tensor .*cuda tensors only"):
            call()


def test_backends_without_a_device_are_not_checked(world1, monkeypatch):
    monkeypatch.delitem(C.BACKEND_DEVICE, "gloo")  # e.g. the fake backend of the planner's meta tracing
    assert C.group_device_types() is None
    C.check_device("all_reduce", None, torch.empty(2, device="meta"))


def test_device_keyed_backend_strings(world1, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert C.group_device_types() == {"cpu", "cuda"}
    C.check_device("all_reduce", None, torch.zeros(1))
    with pytest.raises(C.CollectiveDeviceError):
        C.check_device("all_reduce", None, torch.empty(1, device="meta"))


def test_no_direct_tensor_collectives_outside_the_layer():
    """Every tensor collective of the package goes through collectives.py (its device check)."""
    import pathlib
    import re

    root = pathlib.Path(C.__file__).resolve().parent.parent
    pattern = re.compile(r"(dist|torch\.distributed)\.(all_reduce|all_gather|all_gather_into_tensor|broadcast|"
                         r"all_to_all_single|all_to_all|reduce_scatter|reduce_scatter_tensor|reduce|send|recv)\(")
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "collectives.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


class _Stop(Exception):
    pass


def test_adak_warm_start_stats_are_reduced_on_ctx_device(world1, monkeypatch):
    """The statistics tensor is built on ctx.device; the group is told to expect 'meta' (standing in for cuda,
    which this machine may lack) and the reduction itself is intercepted once the check passed."""
    from moe_train.train.adak import mean_stats_over_ranks

    stats = {"label_k": 1.5, "label_k_per_layer": [1.0, 2.0], "label_acc": 0.25}
    got = mean_stats_over_ranks(stats, ParallelContext(world_size=2))  # real one-rank gloo sum, / world 2
    assert got == {"label_k": 0.75, "label_k_per_layer": [0.5, 1.0], "label_acc": 0.125}
    assert mean_stats_over_ranks(stats, ParallelContext()) == stats  # one process: as is

    monkeypatch.setitem(C.BACKEND_DEVICE, "gloo", "meta")
    seen = []

    def fake_all_reduce(t, **kwargs):
        seen.append(t.device.type)
        raise _Stop

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    with pytest.raises(_Stop):  # not CollectiveDeviceError: the tensor is on ctx.device
        mean_stats_over_ranks(stats, ParallelContext(world_size=2, device=torch.device("meta")))
    assert seen == ["meta"]
