"""DeepEP indices for Megatron's flex dispatcher (parallel/megatron/flex.py) against moe_train's routing plans.

The plan is the reference: its true slots (expert_idx_TK >= 0) are what must travel. From the plan we build the
[T, E] routing map and probabilities as Megatron's router hands them over, then check that deepep_topk returns
exactly each token's true experts with their gate weights, -1 (probability 0) everywhere else, and so as many
dispatched rows as true assignments, where Megatron's own topk conversion would send T * K.
"""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the flex helper lives in "
                                            "moe_train.parallel.megatron)")

from moe_train.config import MoEConfig  # noqa: E402
from moe_train.parallel.megatron.flex import deepep_topk, use_deepep_indices  # noqa: E402
from moe_train.routing import build_router  # noqa: E402


def plan_of(router: str, seed: int = 0, T: int = 64, D: int = 16, **moe):
    torch.manual_seed(seed)
    cfg = MoEConfig(router=router, num_experts=8, **moe)
    r = build_router(D, cfg)
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(std=1.0)
    x = torch.randn(T, D)
    x[::5] *= 0  # some tokens at exactly equal scores
    with torch.no_grad():
        plan = r(x)
    return plan, cfg


def megatron_inputs(plan, E: int):
    """routing_map [T, E] (True = a true pick) and probs [T, E] (its gate weight), as VariableKRouter returns them."""
    T, K = plan.expert_idx_TK.shape
    true_TK = plan.expert_idx_TK >= 0
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    probs = torch.zeros(T, E)
    rows = torch.arange(T)[:, None].expand(T, K)
    routing_map[rows[true_TK], plan.expert_idx_TK[true_TK]] = True
    probs[rows[true_TK], plan.expert_idx_TK[true_TK]] = plan.weight_TK[true_TK].float()
    return routing_map, probs


@pytest.mark.parametrize("router, moe, max_slots", [
    ("null_experts", dict(num_null_experts=8, top_k=4), 4),  # AdaMoE: some tokens pick only null experts
    ("topk", dict(top_k=2), 2),
    ("adak", dict(k_min=0, k_max=3, top_k=2), 3),  # Ada-K: k = 0 tokens have no slot at all
    ("null_experts", dict(num_null_experts=8, top_k=4), 10),  # more slots than experts: the extra ones are -1
])
def test_indices_are_the_plans_true_slots_and_minus_one_elsewhere(router, moe, max_slots):
    plan, cfg = plan_of(router, **moe)
    E = cfg.num_experts
    routing_map, probs = megatron_inputs(plan, E)
    idx, p = deepep_topk(routing_map, probs, max_slots)
    assert idx.shape == p.shape == (routing_map.shape[0], max_slots) and idx.dtype == torch.int64
    assert p.dtype == torch.float32
    for t in range(idx.shape[0]):
        true = sorted(int(e) for e in plan.expert_idx_TK[t] if e >= 0)
        got = [int(e) for e in idx[t] if e >= 0]
        assert got == true, (t, got, true)  # the token's true experts, ascending, first
        assert all(int(e) == -1 for e in idx[t, len(true):])  # then -1 only
        weights = {int(e): float(w) for e, w in zip(plan.expert_idx_TK[t], plan.weight_TK[t]) if e >= 0}
        assert [float(x) for x in p[t, :len(true)]] == [weights[e] for e in got]
        assert (p[t, len(true):] == 0).all()
    rows_sent = int((idx >= 0).sum())
    assert rows_sent == int((plan.expert_idx_TK >= 0).sum()) == int(plan.counts_E.sum())
    # Megatron's own conversion (torch.topk over the probabilities, no -1 without a capacity factor) sends T * K
    _, mega_idx = torch.topk(probs, min(max_slots, E), dim=-1)
    if router != "topk":
        assert mega_idx.numel() > rows_sent


def test_a_token_with_more_picks_than_slots_is_caught():
    routing_map = torch.zeros(3, 4, dtype=torch.bool)
    routing_map[1, :3] = True
    with pytest.raises(RuntimeError, match="more true experts than max_slots"):
        deepep_topk(routing_map, torch.rand(3, 4), 2)


def test_only_deepep_managers_are_changed():
    class _DeepepManager:  # the name Megatron's flex dispatcher gives its DeepEP manager
        num_experts, router_topk = 4, 2

    disp = type("D", (), {"_comm_manager": _DeepepManager()})()
    assert use_deepep_indices(disp, 3) and disp._comm_manager.router_topk == 3
    rm = torch.tensor([[True, False, False, True], [False, False, False, False]])
    disp._comm_manager.setup_metadata(rm, rm.float() * 0.5)
    assert disp._comm_manager.token_indices.tolist() == [[0, 3, -1], [-1, -1, -1]]
    other = type("D", (), {"_comm_manager": type("_HybridEPManager", (), {})()})()
    assert not use_deepep_indices(other, 3) and not use_deepep_indices(object(), 3)


# ----------------------------------------------------------------------------------------------------------
# The wiring: with_variable_k(dispatcher="megatron") under moe_token_dispatcher_type="flex" builds Megatron's own
# MoEFlexTokenDispatcher and _DeepepManager and installs deepep_topk into the manager.
#
# What is real and what is not (CPU, no deep_ep): the layer (ZeroComputeMoELayer -> Megatron's MoELayer.__init__),
# its router, Megatron's MoEFlexTokenDispatcher and _DeepepManager (their own __init__), MoELayer.route /
# preprocess (the flex dispatch_preprocess with _initialize_metadata and the manager's setup_metadata, run eagerly:
# Megatron wraps it in torch.compile) and postprocess (the flex combine_postprocess) are Megatron's and ours,
# unchanged. Stand-ins: DeepEP itself (fused_dispatch / set_deepep_num_sms / hybrid_ep_dispatch are names that only
# have to exist for the managers to be built; they are never called), and the expert-parallel group, an object of
# size 2 (the flex dispatcher asserts tp x ep > 1) that nothing communicates over: the dispatch and combine between
# preprocess and postprocess (DeepEP kernels) are not run here, see bench/gpu_check.py deepep_indices.

class _TwoRankGroup:
    """The ep group as Megatron reads it while building a layer (size, rank); never communicated over here."""

    def size(self):
        return 2

    def rank(self):
        return 0


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist

    import megatron_workers as W

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{W.free_port()}", rank=0, world_size=1)
    mp = pytest.MonkeyPatch()
    with W.cpu_patches(mp):
        yield W, W.pg_collection(_TwoRankGroup(), dist.group.WORLD), W.pg_collection(dist.group.WORLD,
                                                                                     dist.group.WORLD)
    mp.undo()
    if created:
        dist.destroy_process_group()


@pytest.fixture
def deepep_standins(monkeypatch):
    from megatron.core.transformer.moe import token_dispatcher as TD

    monkeypatch.setattr(TD, "fused_dispatch", lambda *a, **k: pytest.fail("DeepEP dispatch is not run on CPU"))
    monkeypatch.setattr(TD, "set_deepep_num_sms", lambda num_sms: None)
    monkeypatch.setattr(TD, "hybrid_ep_dispatch", lambda *a, **k: pytest.fail("HybridEP is not run on CPU"))
    return TD


def _flex_layer(W, pg, routing, seed: int = 0, **cfg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from moe_train.parallel.megatron import compat, with_variable_k

    spec = with_variable_k(get_gpt_layer_local_spec(num_experts=4), routing)
    config = W.make_config(**{"moe_token_dispatcher_type": "flex", **cfg})
    layer = compat.build_moe_layer(spec.submodules.mlp, config=config, pg_collection=pg)
    layer.set_layer_number(1)
    W.set_params(layer, seed)
    r = layer.router
    with torch.no_grad():  # tokens with feature 1 = 5: every null expert scores high (all-null) / Ada-K k = 0
        if r.null_weight is not None:
            r.null_weight[:, 1] = 10
        if r.allocator_weight is not None:
            r.allocator_weight[:, 1] = 0
            r.allocator_weight[0, 1] = 10
    return layer


def _inputs(W, T: int = 24):
    x = torch.randn(T, 1, W.D, generator=torch.Generator().manual_seed(3))
    x[::3, :, 1] = 5.0
    return x


def _route_and_preprocess(layer, x):
    probs, routing_map = layer.route(x)
    with torch.compiler.set_stance("force_eager"):  # Megatron's torch.compile of dispatch_preprocess, run eagerly
        _, token_probs = layer.preprocess(x, probs, routing_map)
    return token_probs


@pytest.mark.parametrize("routing_kw", [
    dict(method="null_experts", num_null_experts=4, top_k=3),  # 3 slots > moe_router_topk 2; all-null tokens
    dict(method="adak", k_min=0, k_max=3),  # Ada-K: k = 0 tokens, k = 3 > moe_router_topk
])
def test_flex_layer_hands_deepep_the_plans_true_experts(megatron_world, deepep_standins, routing_kw):
    from moe_train.parallel.megatron import VariableKRouting, ZeroComputeMoELayer

    W, pg, _ = megatron_world
    layer = _flex_layer(W, pg, VariableKRouting(dispatcher="megatron", **routing_kw))
    disp, router = layer.token_dispatcher, layer.router
    manager = disp._comm_manager
    assert type(layer) is ZeroComputeMoELayer and type(disp) is deepep_standins.MoEFlexTokenDispatcher
    assert type(manager) is deepep_standins._DeepepManager and "setup_metadata" in vars(manager)
    assert router.deepep_indices_installed and manager.router_topk == router.max_slots == 3
    token_probs = _route_and_preprocess(layer, _inputs(W))
    plan = router.last_plan
    idx = manager.token_indices
    assert idx.shape == (plan.expert_idx_TK.shape[0], 3) and token_probs is manager.token_probs
    n_true = (plan.expert_idx_TK >= 0).sum(-1)
    # the cases Megatron's own conversion (topk(probs, moe_router_topk = 2)) gets wrong are present
    assert (n_true == 0).any() and (n_true > layer.config.moe_router_topk).any()
    for t in range(idx.shape[0]):
        true = sorted(int(e) for e in plan.expert_idx_TK[t] if e >= 0)
        assert idx[t].tolist() == true + [-1] * (3 - len(true)), (t, idx[t].tolist(), true)
        w = {int(e): float(v) for e, v in zip(plan.expert_idx_TK[t], plan.weight_TK[t]) if e >= 0}
        assert token_probs[t].tolist() == pytest.approx([w[e] for e in true] + [0.0] * (3 - len(true)), abs=1e-6)
    assert int((idx >= 0).sum()) == int(plan.counts_E.sum())  # rows DeepEP sends = true assignments


@pytest.mark.parametrize("kind", ["identity", "constant"])
def test_flex_layer_adds_the_null_term_on_the_tokens_rank(megatron_world, deepep_standins, kind):
    """Under flex the identity / constant term is added after Megatron's flex combine_postprocess; the routed part
    (DeepEP's combine) is a zero tensor here, so the output is the null term alone, against a per-token loop."""
    from moe_train.parallel.megatron import adamoe

    W, pg, _ = megatron_world
    layer = _flex_layer(W, pg, adamoe(4, top_k=3, null_kind=kind, dispatcher="megatron"))
    if kind == "constant":
        with torch.no_grad():
            layer.router.null_values.normal_(generator=torch.Generator().manual_seed(5))
    x = _inputs(W)
    _route_and_preprocess(layer, x)
    y = layer.postprocess(torch.zeros(x.shape[0] * x.shape[1], W.D), None)
    plan, v = layer.router.last_plan, layer.router.null_values
    ref = torch.zeros(x.shape[0], W.D, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, w in zip(plan.null_idx_TK[t].tolist(), plan.null_weight_TK[t].tolist()):
            if j >= 0:
                ref[t] += w * (x[t, 0].double() if kind == "identity" else v[j].double())
    assert y.shape == x.shape and (plan.null_idx_TK >= 0).any()
    assert (y.reshape(-1, W.D).double() - ref).abs().max().item() < 1e-5


def test_other_dispatchers_are_untouched_and_misuse_is_refused(megatron_world, deepep_standins):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from moe_train.parallel.megatron import VariableKRouter, adamoe

    W, pg2, pg1 = megatron_world
    routing = adamoe(4, top_k=3, dispatcher="megatron")
    x = _inputs(W)
    # allgather: Megatron's dispatcher as it was, nothing installed, the layer runs
    layer = _flex_layer(W, pg1, routing, moe_token_dispatcher_type="allgather")
    assert type(layer.token_dispatcher) is deepep_standins.MoEAllGatherTokenDispatcher
    assert not layer.router.deepep_indices_installed
    assert torch.isfinite(layer(x)[0]).all()
    # a plain MoELayer (not built by with_variable_k) under flex + DeepEP would hand DeepEP topk(probs, 2): refused
    plain = MoELayer(W.make_config(moe_token_dispatcher_type="flex"), W.moe_submodules(VariableKRouter.builder(
        routing)), layer_number=1, pg_collection=pg2)
    with pytest.raises(ValueError, match="ZeroComputeMoELayer"):
        plain.route(x)


def test_hybridep_keeps_megatrons_own_metadata(megatron_world, deepep_standins):
    """HybridEP reads the routing map itself (a null pick is an absent entry): its manager keeps Megatron's
    setup_metadata. megatron-core 0.19's HybridEP manager allocates a CUDA flag when built: GPU-only there."""
    from moe_train.parallel.megatron import adamoe

    W, pg2, _ = megatron_world
    routing = adamoe(4, top_k=3, dispatcher="megatron")
    x = _inputs(W)
    try:
        layer = _flex_layer(W, pg2, routing, moe_flex_dispatcher_backend="hybridep")
    except (RuntimeError, AssertionError) as e:
        if torch.cuda.is_available() or "NVIDIA" not in str(e) and "CUDA" not in str(e):
            raise
        pytest.skip(f"this megatron-core builds its HybridEP manager on CUDA only: {e}")
    manager = layer.token_dispatcher._comm_manager
    assert type(manager) is deepep_standins._HybridEPManager and "setup_metadata" not in vars(manager)
    _route_and_preprocess(layer, x)
    assert torch.equal(manager.routing_map.reshape(x.shape[0], 4), layer.router(x)[1])


def test_without_deep_ep_megatron_refuses_to_build_the_flex_layer(megatron_world):
    """No stand-ins: Megatron's own ImportError, no fallback to another dispatcher."""
    from moe_train.parallel.megatron import adamoe

    try:
        import deep_ep  # noqa: F401
        pytest.skip("deep_ep is installed here")
    except ImportError:
        pass
    W, pg, _ = megatron_world
    with pytest.raises(ImportError, match="DeepEP is not installed"):
        _flex_layer(W, pg, adamoe(4, top_k=3, dispatcher="megatron"))


def test_expert_tensor_parallel_repeats_every_pick():
    """Megatron's flex map covers tp_size x E experts (each pick once per expert-TP rank): K = tp_size x max_slots."""
    class _DeepepManager:
        num_experts, router_topk = 8, 4  # tp 2 x E 4, tp 2 x moe_router_topk 2

    disp = type("D", (), {"_comm_manager": _DeepepManager(), "tp_size": 2})()
    assert use_deepep_indices(disp, 3) and disp._comm_manager.router_topk == 6
    rm_TE = torch.tensor([[True, False, True, True], [False] * 4])
    rm = rm_TE.repeat(1, 2)  # the same picks on both tp ranks' copies of the experts (ep 1)
    disp._comm_manager.setup_metadata(rm, rm.float())
    assert disp._comm_manager.token_indices.tolist() == [[0, 2, 3, 4, 6, 7], [-1] * 6]
