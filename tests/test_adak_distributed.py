"""Ada-K under FSDP2 + expert parallelism, and with bf16 bases: the distributed jobs must train the allocators
exactly as one process on the same global batch does, and bf16 models keep fp32 allocator master weights.

The ranks (tests/adak_workers.py, through tests/ep_workers.py's spawn) run the real ``train_adak`` on the tiny base
saved here; the single-process reference runs the same configs in this process. One spawn per world size runs
every job of that world size (spawning costs ~5 s on this machine)."""

import json

import pytest
import torch

from moe_train.config import AdaKConfig, Config, TrainConfig, from_dict, to_dict
from moe_train.io.model_file import load_model, save_model
from moe_train.parallel.distributed import ParallelContext
from moe_train.train.adak import (
    adak_routers,
    build_allocator_optimizer,
    freeze_base,
    load_adak_model,
    rollout,
    train_adak,
)

import adak_workers as A
import ep_workers as W

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32 allocator weights after a few Adam steps (reduction order differs between world sizes)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("adak_dist")
    save_model(A.base_model(), d / "base.pt")
    return d


def jobs(work, tag: str, ep: int, names: tuple[str, ...]) -> list[dict]:
    # "mb": PPO minibatches smaller than a rank's share; global batch 8 in 4 minibatches of 2 sequences (below)
    spec = {"warm": dict(warm=3, ppo=0), "full": dict(warm=2, ppo=3), "bf16": dict(warm=1, ppo=1, dtype="bfloat16"),
            "mb": dict(warm=1, ppo=2, batch=8, minibatches=4)}
    return [{"name": n, "cfg": to_dict(A.job_config(str(work / "base.pt"), str(work / tag / n), ep=ep, **spec[n]))}
            for n in names]


@pytest.fixture(scope="module")
def single(work):
    """The reference: every job in this process (no process group), on the whole global batch."""
    out = {}
    for job in jobs(work, "single", 1, ("warm", "full", "mb")):
        cfg = from_dict(Config, job["cfg"])
        model = load_adak_model(cfg)
        train_adak(cfg, model, ParallelContext())
        out[job["name"]] = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(A.ALLOCATOR)}
    return out


@pytest.fixture(scope="module")
def two(work):
    (work / "spawn2").mkdir()
    return W.spawn(A.run_jobs, 2, work / "spawn2", ep=2, jobs=jobs(work, "two", 2, ("warm", "full", "bf16", "mb")))


@pytest.fixture(scope="module")
def four(work):
    (work / "spawn4").mkdir()
    return W.spawn(A.run_jobs, 4, work / "spawn4", ep=2, jobs=jobs(work, "four", 2, ("warm", "mb")))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _max_abs(a: dict) -> float:
    return max(v.abs().max().item() for v in a.values())


def _ppo_records(work, tag: str, name: str) -> list[dict]:
    """The PPO lines of a job's metrics.jsonl (rank 0 writes them)."""
    lines = (work / tag / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == "ppo"]


@pytest.mark.parametrize("world", [2, 4])
def test_warm_start_trains_allocators_as_one_process(world, single, request):
    ranks = request.getfixturevalue("two" if world == 2 else "four")  # spawn only the world size asked for
    ref = single["warm"]  # the allocators start at zero: the weights are the change
    for rank, res in enumerate(ranks):
        got = res["warm"]
        diff, change, ref_change = _max_diff(got["allocators"], ref), _max_abs(got["allocators"]), _max_abs(ref)
        print(f"world {world} rank {rank}: warm-start allocator change max|dW| {change:.6f} "
              f"(one process {ref_change:.6f}), max diff {diff:.2e}")
        assert ref_change > 1e-2  # the reference did train
        assert diff <= TOL, (f"world {world} rank {rank}: max|dW| {change:.6f} vs one process {ref_change:.6f}, "
                             f"diff {diff:.3e}")
        assert got["stranded"] == [], f"gradients left on FSDP's unsharded parameters: {got['stranded']}"
        assert got["base_grads"] == []


def test_warm_start_plus_ppo_equals_one_process(work, single, two):
    ref = single["full"]
    for rank, res in enumerate(two):
        got = res["full"]
        diff = _max_diff(got["allocators"], ref)
        print(f"rank {rank}: warm start + PPO allocators max|W| {_max_abs(got['allocators']):.6f} "
              f"(one process {_max_abs(ref):.6f}), max diff {diff:.2e}")
        assert diff <= TOL, f"rank {rank}: allocators differ from one process by {diff:.3e}"
        assert got["stranded"] == [] and got["base_grads"] == []
    # identical sampled actions: the per-layer mean k of every PPO step agree (rank 0 writes the metrics)
    ppo = {tag: _ppo_records(work, tag, "full") for tag in ("single", "two")}
    assert len(ppo["single"]) == len(ppo["two"]) == 3
    for r1, r2 in zip(ppo["single"], ppo["two"]):
        assert r1["mean_k_per_layer"] == pytest.approx(r2["mean_k_per_layer"], abs=1e-9), (r1, r2)
        assert r1["reward"] == pytest.approx(r2["reward"], abs=1e-5)


def test_bf16_job_under_fsdp2_keeps_fp32_allocators_and_saves(work, two):
    saved = load_model(work / "two" / "bf16" / "final" / "model.pt")
    sd = saved.state_dict()
    for res in two:
        got = res["bf16"]
        assert got["allocator_dtypes"] == ["torch.float32"] and got["base_dtypes"] == ["torch.bfloat16"], got
        assert got["stranded"] == [] and got["base_grads"] == []
        assert _max_abs(got["allocators"]) > 1e-3  # it trained
        for k, v in got["allocators"].items():  # the checkpoint holds the fp32 master weights, bit for bit
            assert torch.equal(sd[k], v), k
    assert saved.config.moe.router == "adak"


def test_bf16_allocators_keep_fp32_master_weights_and_weight_decay(work, tmp_path):
    """adak.dtype bfloat16: the base is bf16, the allocators fp32 master weights with fp32 AdamW state, so a
    weight-decay-only step (lr 1e-3 x wd 0.1 = a 1e-4 relative change, below bf16's 2^-8 resolution) applies
    exactly as in an fp32 reference; the allocator computes in fp32; save + load keeps the fp32 values."""
    cfg = A.job_config(str(work / "base.pt"), str(tmp_path / "run"), warm=0, ppo=0, dtype="bfloat16")
    model = load_adak_model(cfg)
    params = freeze_base(model)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert [p.dtype for p in params] == [torch.float32] * len(params), [p.dtype for p in params]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # weights of magnitude 0.01 .. 1, both signs
            mag = torch.empty(p.shape).uniform_(0.01, 1.0, generator=g)
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.5, -mag, mag))
    ref = [p.detach().float().clone().requires_grad_(True) for p in params]
    a, t = AdaKConfig(lr=1e-3, weight_decay=0.1), TrainConfig()
    opt = build_allocator_optimizer(params, a, t)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, betas=(t.beta1, t.beta2))
    before = [p.detach().float().clone() for p in params]
    for p, r in zip(params, ref):
        p.grad, r.grad = torch.zeros_like(p), torch.zeros_like(r)
    opt.step()
    ref_opt.step()
    for p, r, w0 in zip(params, ref, before):
        assert p.dtype == torch.float32
        for name, s in opt.state[p].items():
            if name != "step":
                assert s.dtype == torch.float32, (name, s.dtype)
        change = (p.detach().float() - w0).abs().max().item()
        expected = (r.detach() - w0).abs().max().item()
        assert torch.equal(p.detach().float(), r.detach()), f"decay step changed W by {change:.3e}, fp32 {expected:.3e}"
    # the allocator runs in fp32 on the bf16 hidden states: log pi from a float64 reference of x.float() @ W^T
    xs = []
    hooks = [r.register_forward_hook(lambda m, a_, o: xs.append(a_[0].detach())) for r in adak_routers(model)]
    inputs = torch.randint(0, 32, (2, 8), generator=g)
    ro = rollout(model, inputs, inputs, 0.0, mode="greedy")
    for h in hooks:
        h.remove()
    assert ro.old_log_prob_LT.dtype == torch.float32
    for x, p, lp in zip(xs, params, ro.old_log_prob_LT):
        assert x.dtype == torch.bfloat16
        want = torch.log_softmax(x.double() @ p.detach().double().T, -1).max(-1).values
        torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)
    # save + load back: the fp32 masters survive, also through load_adak_model with dtype bfloat16
    save_model(model, tmp_path / "adak.pt")
    assert load_model(tmp_path / "adak.pt").config.moe.router == "adak"
    cfg.train.init_from = str(tmp_path / "adak.pt")
    again = load_adak_model(cfg)
    for r, p in zip(adak_routers(again), params):
        assert r.allocator.weight.dtype == torch.float32 and torch.equal(r.allocator.weight, p.detach())
    assert again.embed_tokens.weight.dtype == torch.bfloat16


PPO_STATS = ("reward", "loglik", "advantage_std", "policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm")


@pytest.mark.parametrize("world", [2, 4])
def test_ppo_minibatches_equal_one_process_with_empty_shares(world, work, single, request):
    """ppo_minibatches 4 on a global batch of 8: every PPO minibatch is 2 global sequences of one shared
    permutation. At 4 ranks (2 sequences each) at least 2 ranks hold none of every minibatch and must still run
    its forward (all-to-all) and backward (FSDP reduce-scatter) with a zero contribution; at 2 ranks a minibatch
    lies on one rank or splits 1 + 1. Allocators, actions and the per-step statistics equal one process's."""
    ranks = request.getfixturevalue("two" if world == 2 else "four")
    ref = single["mb"]
    for rank, res in enumerate(ranks):
        got = res["mb"]
        diff = _max_diff(got["allocators"], ref)
        print(f"world {world} rank {rank}: ppo_minibatches 4 allocators max|W| {_max_abs(got['allocators']):.6f} "
              f"(one process {_max_abs(ref):.6f}), max diff {diff:.2e}")
        assert _max_abs(ref) > 1e-2  # the reference did train
        assert diff <= TOL, f"world {world} rank {rank}: allocators differ from one process by {diff:.3e}"
        assert got["stranded"] == [] and got["base_grads"] == []
    one, many = _ppo_records(work, "single", "mb"), _ppo_records(work, {2: "two", 4: "four"}[world], "mb")
    assert len(one) == len(many) == 2
    for r1, r2 in zip(one, many):
        assert r1["mean_k_per_layer"] == pytest.approx(r2["mean_k_per_layer"], abs=1e-9), (r1, r2)
        for key in PPO_STATS:  # global statistics, not means of per-rank ones
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), (key, r1[key], r2[key])
