"""moe_train inside Megatron-Core (moe_train.parallel.megatron) on CPU, against independent references.

  * fixed k, no null experts: our router (with Megatron's allgather dispatcher, and with our all-to-all) equals
    Megatron's own TopKRouter at the same weights: outputs, input and every parameter gradient, aux / z-loss
    logging, for both gate conventions (Mixtral renormalised, Qwen pre-softmax + scaling factor);
  * null experts and Ada-K: the Megatron layer equals moe_train's own MoELayer at the same weights (outputs and
    gradients including the balancing terms), tokens with no true expert output 0 and are never dispatched,
    padding is excluded from the balancing terms;
  * 2 gloo ranks: our dispatcher inside Megatron (ep=2) equals the single-rank layer with Megatron's allgather
    dispatcher, including a rank that receives no rows and a rank with no tokens;
  * spec helpers (local and Transformer Engine specs, decoder block specs, a whole GPTModel), checkpoint
    conversion, the compat branches of Megatron 0.16.1 and 0.19, and user mistakes.
Needs megatron-core (a `test` extra); skipped with the reason below when it is missing. Megatron's CUDA-only calls
are patched for the tests only (tests/megatron_workers.py: cpu_patches).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import warnings

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core; "
                                            "0.16.1 on Python 3.11): the Megatron-Core integration is untested")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.model.moe_layer import MoELayer as OurMoELayer  # noqa: E402
from moe_train.parallel.megatron import (  # noqa
    VariableKAllToAllDispatcher,
    VariableKMoELayer,
    VariableKRouter,
    VariableKRouting,
    ZeroComputeMoELayer,
    adak,
    adamoe,
    add_null_experts,
    compat,
    convert_checkpoint_file,
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    router_state_from_moe_train,
    routing_map_to_slots,
    sequential_mlp_state_from_moe_train,
    topk,
    with_variable_k,
)

import megatron_workers as W  # noqa: E402

TOL = 1e-5  # fp32 outputs / gradients of two implementations (Megatron's vs ours): relative, see W.relerr
D = W.D


@pytest.fixture(scope="module")
def pg():
    """A 1-rank gloo world; every Megatron process group is that world."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{W.free_port()}", rank=0, world_size=1)
    mp = pytest.MonkeyPatch()
    with W.cpu_patches(mp):
        yield W.pg_collection(dist.group.WORLD, dist.group.WORLD)
    mp.undo()
    if created:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def fresh_tracker():
    compat.clear_moe_metrics()
    yield
    compat.clear_moe_metrics()


def tracked(name: str) -> float:
    return float(compat.moe_metric_values(name)[0])


def run(layer, x, proj, extra_loss=None):
    """Forward + backward of sum(y * proj); returns y, the input gradient and every parameter gradient."""
    xx = x.clone().requires_grad_(True)
    y, bias = layer(xx)
    assert bias is None
    loss = (y * proj).sum()
    if extra_loss is not None:
        loss = loss + extra_loss()
    loss.backward()
    return y.detach(), xx.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_routing_map_to_slots_lists_each_tokens_experts():
    g = torch.Generator().manual_seed(0)
    rm = torch.rand(50, 6, generator=g) < 0.3
    rm[3] = False  # a token with no expert
    idx = routing_map_to_slots(rm, max_slots=6)
    for t in range(50):
        expected = rm[t].nonzero().flatten().tolist()
        assert idx[t].tolist() == expected + [-1] * (6 - len(expected))
    assert routing_map_to_slots(rm[:, :2], max_slots=4).shape == (50, 2)  # K <= E


@pytest.mark.parametrize("qwen", [False, True], ids=["mixtral_gates", "qwen_pre_softmax_scaled"])
def test_fixed_k_equals_megatron_topk_router(pg, qwen):
    kw = dict(moe_router_pre_softmax=True, moe_router_topk_scaling_factor=2.0) if qwen else {}
    cfg = W.make_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, **kw)
    ref = W.build_layer(cfg, pg)  # Megatron's TopKRouter + allgather dispatcher
    assert type(ref.router).__name__ == "TopKRouter"
    W.set_params(ref)
    ours = {"megatron_dispatcher": W.build_layer(cfg, pg, VariableKRouter.builder(topk(dispatcher="megatron"))),
            "our_all_to_all": W.build_layer(cfg, pg, VariableKRouter.builder(topk()), ours=True)}
    g = torch.Generator().manual_seed(3)
    x, proj = torch.randn(6, 2, D, generator=g), torch.randn(6, 2, D, generator=g)
    y_ref, gx_ref, grads_ref = run(ref, x, proj)
    lb_ref, z_ref = tracked("load_balancing_loss"), tracked("z_loss")
    assert lb_ref > 0 and z_ref > 0
    with torch.no_grad():
        probs_ref, map_ref = ref.router(x)
    for name, layer in ours.items():
        assert layer.load_state_dict(ref.state_dict(), strict=True)
        compat.clear_moe_metrics()
        y, gx, grads = run(layer, x, proj)
        assert W.relerr(y, y_ref) <= TOL and W.relerr(gx, gx_ref) <= TOL, name
        assert set(grads) == set(grads_ref)
        bad = {n: W.relerr(grads[n], grads_ref[n]) for n in grads if not W.relerr(grads[n], grads_ref[n]) <= TOL}
        assert not bad, (name, bad)
        assert abs(tracked("load_balancing_loss") - lb_ref) <= 1e-6
        assert abs(tracked("z_loss") - z_ref) <= 1e-5 * max(1.0, z_ref)  # fp32 mean of squared logsumexp: relative
        with torch.no_grad():
            probs, rmap = layer.router(x)
        assert torch.equal(rmap, map_ref) and W.maxerr(probs, probs_ref) <= 1e-6
    assert isinstance(ours["our_all_to_all"].token_dispatcher, VariableKAllToAllDispatcher)
    assert ours["our_all_to_all"].token_dispatcher.last.rows_sent == 12 * 2


def _moe_train_layer(seed=0, **moe):
    torch.manual_seed(seed)
    layer = OurMoELayer(ModelConfig(hidden_size=D, intermediate_size=W.FF, moe=MoEConfig(num_experts=4, **moe)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        r = layer.router
        if getattr(r, "null_gate", None) is not None:  # tokens with feature 1 = 5 pick only null experts
            r.null_gate.weight[:, 1] = 10
        if getattr(r, "allocator", None) is not None:  # ... or k = 0 under Ada-K
            r.allocator.weight[:, 1] = 0
            r.allocator.weight[0, 1] = 10
    return layer


def _megatron_from_moe_train(cfg, pg, mt, routing, ours):
    layer = W.build_layer(cfg, pg, VariableKRouter.builder(routing), ours=ours)
    layer.router.load_state_dict(router_state_from_moe_train(mt.router), strict=True)
    layer.experts.load_state_dict(sequential_mlp_state_from_moe_train(mt.experts, layer.local_expert_indices),
                                  strict=True)
    return layer


VARIABLE_K_CASES = {
    "adamoe": (dict(router="null_experts", num_null_experts=4, top_k=3), adamoe(4, top_k=3), {}),
    "adamoe_qwen": (dict(router="null_experts", num_null_experts=8, top_k=4, norm_topk_prob=False), adamoe(8, top_k=4),
                    dict(moe_router_pre_softmax=True)),
    "adak_k0": (dict(router="adak", k_min=0, k_max=3), adak(k_min=0, k_max=3), {}),
}


@pytest.mark.parametrize("case", list(VARIABLE_K_CASES))
@pytest.mark.parametrize("ours", [True, False], ids=["our_all_to_all", "megatron_allgather"])
def test_variable_k_equals_moe_train_layer(pg, case, ours):
    moe, routing, cfg_kw = VARIABLE_K_CASES[case]
    coef, zcoef = 0.01, 1e-3
    mt = _moe_train_layer(**moe)
    cfg = W.make_config(moe_router_topk=2, moe_aux_loss_coeff=coef, moe_z_loss_coeff=zcoef, **cfg_kw)
    layer = _megatron_from_moe_train(cfg, pg, mt, routing if ours else dataclasses.replace(routing,
                                                                                           dispatcher="megatron"), ours)
    g = torch.Generator().manual_seed(4)
    x, proj = torch.randn(8, 2, D, generator=g), torch.randn(8, 2, D, generator=g)
    x[..., 1] = 0.0
    x[::3, :, 1] = 5.0
    T = 16
    # Reference: moe_train's layer on the same rows ([S, B] flattened), its balancing terms added by hand.
    xr = x.reshape(1, T, D).clone().requires_grad_(True)
    y_ref, plan = mt(xr)
    ((y_ref * proj.reshape(1, T, D)).sum() + coef * plan.aux_loss + zcoef * plan.z_loss).backward()

    y, gx, grads = run(layer, x, proj)
    assert W.relerr(y.reshape(1, T, D), y_ref) <= TOL
    assert W.relerr(gx.reshape(1, T, D), xr.grad) <= TOL
    ref_router = {"weight": mt.router.gate.weight.grad}
    if getattr(mt.router, "null_gate", None) is not None:
        ref_router["null_weight"] = mt.router.null_gate.weight.grad
    for name, g_ref in ref_router.items():
        assert W.relerr(grads[f"router.{name}"], g_ref) <= TOL, name
    if "router.allocator_weight" in grads:  # greedy k: the allocator is off the output's graph in both
        assert grads["router.allocator_weight"] is None and mt.router.allocator.weight.grad is None
    expert_grads = sequential_mlp_state_from_moe_train(types.SimpleNamespace(
        w_gate=mt.experts.w_gate.grad, w_up=mt.experts.w_up.grad, w_down=mt.experts.w_down.grad), range(4))
    for name, g_ref in expert_grads.items():
        assert W.relerr(grads[f"experts.{name}"], g_ref) <= TOL, name
    assert abs(tracked("load_balancing_loss") - plan.aux_loss.item()) <= 1e-6
    # fp32 mean of squared logsumexp (~99 here: 1e-5 absolute was ~1 ulp): relative
    assert abs(tracked("z_loss") - plan.z_loss.item()) <= 1e-5 * max(1.0, plan.z_loss.item())
    # Tokens with no true expert: an all-False routing-map row, output exactly 0, never dispatched.
    true_T = (plan.expert_idx_TK >= 0).sum(1)
    assert (true_T == 0).sum() > 0 and (y.reshape(T, D)[true_T == 0] == 0).all()
    assert abs(tracked("true_experts_per_token") - true_T.float().mean().item()) <= 1e-6
    if ours:
        assert layer.token_dispatcher.last.rows_sent == int(true_T.sum()) < T * plan.expert_idx_TK.shape[1]
    if case.startswith("adak"):
        assert torch.equal(layer.router.last_plan.action_T, plan.action_T)
        assert W.maxerr(layer.router.last_plan.log_prob_T, plan.log_prob_T) <= 1e-6


def test_padding_is_excluded_from_balancing_terms(pg):
    mt = _moe_train_layer(router="null_experts", num_null_experts=4, top_k=3)
    cfg = W.make_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    layer = _megatron_from_moe_train(cfg, pg, mt, adamoe(4, top_k=3), ours=True)
    x = torch.randn(6, 2, D, generator=torch.Generator().manual_seed(5))
    pad_SB = torch.zeros(6, 2, dtype=torch.bool)
    pad_SB[4:, 1] = True  # the last two positions of sequence 1 are padding
    layer.router(x, padding_mask=pad_SB)
    valid = ~pad_SB.reshape(-1)
    plan = mt.router(x.reshape(-1, D)[valid])  # moe_train's router on the valid tokens only
    assert abs(tracked("load_balancing_loss") - plan.aux_loss.item()) <= 1e-6
    # fp32 mean of squared logsumexp (~99 here: 1e-5 absolute was ~1 ulp): relative
    assert abs(tracked("z_loss") - plan.z_loss.item()) <= 1e-5 * max(1.0, plan.z_loss.item())


def test_two_ranks_equal_single_rank(tmp_path):
    res = W.spawn("ep_suite", 2, tmp_path)
    for rank, per_case in enumerate(res):
        for case, r in per_case.items():
            bad = {k: v for k, v in r["err"].items() if not v <= TOL}  # fp32, relative (W.relerr)
            assert not bad, f"rank {rank} {case}: errors above {TOL}: {bad}"
            assert any(k.startswith("grad:experts.") for k in r["err"]) and "grad:router.weight" in r["err"]
            assert r["rows_sent"] == r["true_local"]  # never a null pick, never T * topk
    cases = {case: [r[case] for r in res] for case in res[0]}
    zero = cases["topk_zero_rank"]
    assert zero[1]["rows_received"] == 0 and zero[0]["rows_received"] == sum(c["true_local"] for c in zero)
    for case in ("null_all_null", "adak_k0"):
        assert all(c["no_expert_tokens"] > 0 for c in cases[case]), case
        assert all(c["true_local"] < c["slots"] for c in cases[case])
    empty = cases["null_empty_rank"]
    assert empty[1]["tokens"] == 0 and empty[1]["rows_sent"] == 0 and empty[1]["rows_received"] > 0
    for c in cases.values():  # nothing lost or duplicated across ranks
        assert sum(r["rows_sent"] for r in c) == sum(r["rows_received"] for r in c)


def _mlp_class(mlp):
    """The class a layer spec's mlp entry builds: ModuleSpec.module (0.16.1) or the builder partial's class (0.19:
    partial(MoELayer, ...) or partial(MLP.as_mlp_submodule, ...))."""
    if isinstance(mlp, functools.partial):
        return getattr(mlp.func, "__self__", mlp.func)
    return mlp.module


def test_spec_helpers_patch_local_te_and_block_specs(pg, monkeypatch):
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.mlp import MLP

    routing = adamoe(4, top_k=3)
    cfg = W.make_config()
    specs = {"local": get_gpt_layer_spec(routing, use_te=False, num_experts=4)}
    # No Transformer Engine here: Megatron's own TE spec builder runs with local classes in TE's place.
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", LocalSpecProvider, raising=False)
    specs["te"] = get_gpt_layer_spec(routing, use_te=True, num_experts=4)
    x = torch.randn(4, 2, D)
    for kind, spec in specs.items():
        mlp = spec.submodules.mlp  # a ModuleSpec in 0.16.1, a builder partial in 0.19 (compat handles both)
        assert compat.moe_spec_parts(mlp)[0] is VariableKMoELayer, kind
        layer = compat.build_moe_layer(mlp, config=cfg, pg_collection=pg)
        assert isinstance(layer.router, VariableKRouter) and layer.router.routing == routing
        assert isinstance(layer.token_dispatcher, VariableKAllToAllDispatcher)
        assert layer.token_dispatcher.permute_backend == routing.permute_backend
        y, _ = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert compat.moe_spec_parts(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4).submodules.mlp)[0] \
        is MoELayer  # untouched
    kept = with_variable_k(gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4),
                           dataclasses.replace(routing, dispatcher="megatron"))
    kept_cls, kept_subs = compat.moe_spec_parts(kept.submodules.mlp)  # Megatron's dispatcher, our layer hooks
    assert kept_cls is ZeroComputeMoELayer and kept_subs.router.func is VariableKRouter
    with pytest.raises(ValueError, match="no MoE layer"):
        with_variable_k(gpt_layer_specs.get_gpt_layer_local_spec(), routing)
    with pytest.raises(ValueError, match="num_experts"):
        get_gpt_layer_spec(routing, use_te=False)
    assert cfg.moe_token_dispatcher_type == "allgather"  # restored after building our layer

    # A decoder block with dense and MoE layers (moe_layer_freq), then a whole GPTModel.
    import contextlib

    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import random as tp_random

    monkeypatch.setattr(tp_random.CudaRNGStatesTracker, "fork",  # attention dropout RNG: CUDA-only
                        lambda self, name="model-parallel-rng": contextlib.nullcontext())
    parallel_state.initialize_model_parallel(1, 1)
    try:
        block_cfg = W.make_config(moe_layer_freq=[1, 0], moe_aux_loss_coeff=0.01)
        block = get_gpt_decoder_block_spec(block_cfg, topk(), use_transformer_engine=False)
        assert [_mlp_class(s.submodules.mlp) for s in block.layer_specs] == [VariableKMoELayer, MLP]
        plain = gpt_layer_specs.get_gpt_decoder_block_spec(block_cfg, use_transformer_engine=False)
        ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(8)[None].expand(2, 8)
        mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril().logical_not()
        losses, grads, state = [], [], None
        for spec in (plain, block):  # one line switches the model; at the same weights nothing else changes
            torch.manual_seed(0)
            model = GPTModel(config=block_cfg, transformer_layer_spec=spec, vocab_size=32, max_sequence_length=16,
                             position_embedding_type="rope")
            if state is not None:
                model.load_state_dict(state, strict=True)
            state = model.state_dict()
            loss = model(ids, pos, mask, labels=ids).mean()
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad for n, p in model.named_parameters()})
        assert abs(losses[0] - losses[1]) <= 1e-6
        assert all(W.relerr(grads[1][n], grads[0][n]) <= TOL for n in grads[0])
        adamoe_model = GPTModel(config=block_cfg, transformer_layer_spec=get_gpt_decoder_block_spec(
            block_cfg, adamoe(4, top_k=3), use_transformer_engine=False), vocab_size=32, max_sequence_length=16,
            position_embedding_type="rope")
        adamoe_model.load_state_dict(state, strict=True)  # a top-k checkpoint: null gates from the true gates
        assert torch.isfinite(adamoe_model(ids, pos, mask, labels=ids)).all()
    finally:
        parallel_state.destroy_model_parallel()


def test_checkpoint_conversion_adds_null_twins(pg, tmp_path):
    cfg = W.make_config()
    topk_layer = W.build_layer(cfg, pg)  # Megatron's TopKRouter
    W.set_params(topk_layer)
    sd = {f"decoder.layers.0.mlp.{k}": v for k, v in topk_layer.state_dict().items()}
    converted = add_null_experts(sd, 8)
    w = sd["decoder.layers.0.mlp.router.weight"]
    assert torch.equal(converted["decoder.layers.0.mlp.router.null_weight"], torch.cat([w, w]))
    src, dst = tmp_path / "model_optim_rng.pt", tmp_path / "out" / "model_optim_rng.pt"
    torch.save({"model": sd, "iteration": 7}, src)
    assert convert_checkpoint_file(src, dst, 8) == 1
    out = torch.load(dst, weights_only=False)
    assert out["iteration"] == 7 and torch.equal(out["model"]["decoder.layers.0.mlp.router.null_weight"],
                                                 converted["decoder.layers.0.mlp.router.null_weight"])
    # Straight into an AdaMoE layer: every true expert's m/E null twins get exactly its logit.
    layer = W.build_layer(cfg, pg, VariableKRouter.builder(adamoe(8, top_k=4)), ours=True)
    layer.load_state_dict(topk_layer.state_dict(), strict=True)
    x = torch.randn(5, D)
    logits_true, logits_null = x @ layer.router.weight.t(), x @ layer.router.null_weight.t()
    assert torch.equal(logits_null, torch.cat([logits_true, logits_true], 1))
    with pytest.raises(ValueError, match="already has null experts"):
        add_null_experts(converted, 8)
    with pytest.raises(ValueError, match="multiple of num_moe_experts"):
        add_null_experts(sd, 6)
    with pytest.raises(ValueError, match="router.weight"):
        add_null_experts({"embedding.weight": w}, 4)


class _FakeTracker:
    """The 0.19 MoEMetricsTracker interface (record(name, value, layer_number, num_layers, ...))."""

    def __init__(self):
        self.calls = []

    def record(self, name, value, layer_number, num_layers, reduce_group=None, avg_group=None, needs_dp_avg=True):
        self.calls.append((name, float(value), layer_number, num_layers, needs_dp_avg))


def test_compat_version_branches(pg, monkeypatch):
    cfg = W.make_config(moe_aux_loss_coeff=0.01, mtp_num_layers=1)
    x = torch.randn(4, 2, D)
    build = VariableKRouter.builder(adamoe(4, top_k=3))
    # 0.16.1: MoELayer calls the builder with config / pg_collection; metrics go to save_to_aux_losses_tracker.
    router = build(config=cfg, pg_collection=pg)
    router.set_layer_number(2)
    router(x)
    rows = compat.moe_metric_values("load_balancing_loss").clone()
    assert rows.shape == (3,) and rows[1] > 0 and rows[0] == rows[2] == 0
    # 0.19: is_mtp_layer reaches the router, an MTP layer logs after the decoder's rows, into the metrics tracker.
    fake = _FakeTracker()
    monkeypatch.setitem(sys.modules, "megatron.core.transformer.moe.moe_logging",
                        types.SimpleNamespace(get_moe_metrics_tracker=lambda: fake))
    mtp_router = build(config=cfg, pg_collection=pg, is_mtp_layer=True)
    mtp_router.load_state_dict(router.state_dict())
    mtp_router.set_layer_number(1)
    mtp_router(x)
    by_name = {c[0]: c for c in fake.calls}
    assert by_name["load_balancing_loss"][2:] == (1 + cfg.num_layers, 3, True)
    assert abs(by_name["load_balancing_loss"][1] - float(rows[1])) <= 1e-6
    # MoELayer keywords: 0.16.1 has no is_mtp_layer (dropped while False, refused when True); 0.19 takes it.
    if compat.accepts_keyword(MoELayer.__init__, "is_mtp_layer"):  # the installed Megatron is 0.19-like
        assert compat.moe_layer_kwargs(MoELayer.__init__, is_mtp_layer=True) == {"is_mtp_layer": True}
    else:
        assert compat.moe_layer_kwargs(MoELayer.__init__, is_mtp_layer=False) == {}
        with pytest.raises(ValueError, match="is_mtp_layer"):
            compat.moe_layer_kwargs(MoELayer.__init__, is_mtp_layer=True)

    def init_019(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False):
        pass

    assert compat.moe_layer_kwargs(init_019, is_mtp_layer=True) == {"is_mtp_layer": True}
    # 0.19 specs: experts are builder callables (kept as they are); a builder-style partial MoE spec is patched.
    experts_builder = functools.partial(dict, kind="experts")
    subs = dataclasses.replace(W.moe_submodules(), experts=experts_builder)
    holder = types.SimpleNamespace  # a non-dataclass holder is left alone
    spec_019 = [functools.partial(MoELayer, submodules=subs), holder(mlp=1)]
    patched = with_variable_k(spec_019, adamoe(4, top_k=3))
    assert patched[0].func is VariableKMoELayer and patched[0].keywords["submodules"].experts is experts_builder
    assert patched[0].keywords["submodules"].router.func is VariableKRouter and patched[1] is spec_019[1]


@pytest.mark.parametrize("routing, cfg_kw, match", [
    (VariableKRouting(method="bogus"), {}, "method"),
    (VariableKRouting(method="null_experts", num_null_experts=0), {}, "num_null_experts"),
    (adamoe(4, top_k=9), {}, "top_k"),
    (adak(k_min=3, k_max=2), {}, "k_min"),
    (adamoe(4, dispatcher="deepep"), {}, "dispatcher"),
    (adamoe(4, dispatcher="megatron"), dict(moe_token_dispatcher_type="alltoall", moe_permute_fusion=True),
     "moe_permute_fusion"),
    (adamoe(4), dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor"),
    (adamoe(4), dict(moe_router_num_groups=2, moe_router_group_topk=1), "moe_router_pre_softmax"),
    (adamoe(4), dict(add_bias_linear=True), "add_bias_linear"),
    (adamoe(4), dict(moe_router_load_balancing_type="seq_aux_loss"), "seq_aux_loss"),
])
def test_user_mistakes_raise_value_errors(pg, routing, cfg_kw, match):
    kw = dict(cfg_kw)
    if kw.get("moe_permute_fusion"):  # TransformerConfig itself wants Transformer Engine's fused permute for it
        cfg = W.make_config()
        cfg.moe_token_dispatcher_type, cfg.moe_permute_fusion = "alltoall", True
    else:
        cfg = W.make_config(**kw)
    with pytest.raises(ValueError, match=match):
        VariableKRouter.builder(routing)(config=cfg, pg_collection=pg)


def test_dispatcher_refuses_more_experts_than_declared(pg):
    cfg = W.make_config()
    layer = W.build_layer(cfg, pg, VariableKRouter.builder(topk()), ours=True)
    disp = layer.token_dispatcher
    assert disp.max_slots == 2
    rm = torch.zeros(4, 4, dtype=torch.bool)
    rm[0, :3] = True  # a token with 3 experts, 2 declared
    with pytest.raises(ValueError, match="max_slots=2"):
        disp.dispatch_preprocess(torch.randn(4, 1, D), rm, rm.float())


def test_triton_permutation_backend_in_our_dispatcher(pg):
    """The GPU path's permutation kernels (Triton, interpreted on CPU) inside our dispatcher: same layer output and
    gradients as Megatron's own router + allgather dispatcher, with all-null tokens present."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    name = "moe_train.kernels.triton_permute"
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")  # triton reads it when the module's kernels are defined
    sys.modules.pop(name, None)
    try:
        assert importlib.import_module(name).INTERPRETED
        mt = _moe_train_layer(router="null_experts", num_null_experts=4, top_k=3)
        cfg = W.make_config()
        ref = _megatron_from_moe_train(cfg, pg, mt, adamoe(4, top_k=3, dispatcher="megatron"), ours=False)
        layer = _megatron_from_moe_train(cfg, pg, mt, adamoe(4, top_k=3, permute_backend="triton"), ours=True)
        g = torch.Generator().manual_seed(6)
        x, proj = torch.randn(5, 2, D, generator=g), torch.randn(5, 2, D, generator=g)
        x[::2, :, 1] = 5.0  # all-null tokens
        y_ref, gx_ref, grads_ref = run(ref, x, proj)
        y, gx, grads = run(layer, x, proj)
        assert W.relerr(y, y_ref) <= TOL and W.relerr(gx, gx_ref) <= TOL
        assert all(W.relerr(grads[n], grads_ref[n]) <= TOL for n in grads_ref)
        assert layer.token_dispatcher.permute_backend == "triton"
        assert layer.token_dispatcher.last.rows_sent < 10 * 3
    finally:
        sys.modules.pop(name, None)  # the next importer gets a compiled copy
        mp.undo()


def test_our_layer_replaces_megatrons_alltoall_without_building_it(pg):
    """With moe_token_dispatcher_type='alltoall' (the usual setting) Megatron's own alltoall dispatcher, whose
    constructor needs a CUDA stream, is never built; the shared config keeps its value."""
    cfg = W.make_config(moe_token_dispatcher_type="alltoall")
    layer = W.build_layer(cfg, pg, VariableKRouter.builder(adak(k_min=1, k_max=3)), ours=True)
    assert isinstance(layer.token_dispatcher, VariableKAllToAllDispatcher)
    assert cfg.moe_token_dispatcher_type == "alltoall"
    assert layer.token_dispatcher.max_slots == 3  # the Ada-K router's k_max, not moe_router_topk=2
    y, _ = layer(torch.randn(4, 2, D))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="moe_shared_expert_overlap"):
        W.build_layer(W.make_config(moe_shared_expert_intermediate_size=8, moe_shared_expert_overlap=True,
                                    moe_token_dispatcher_type="alltoall"), pg,
                      VariableKRouter.builder(topk()), ours=True)
