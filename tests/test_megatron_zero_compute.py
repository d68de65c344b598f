"""Megatron-Core (CPU): identity / constant null experts, and our variable-k router inside a DeepSeek-style GPTModel
(multi-latent attention, shared experts, a dense first layer). docs/megatron.md, "DeepSeek-style models on CPU".

  * one MoE layer with shared experts: Megatron's layer with our router (our all-to-all dispatcher, and Megatron's
    allgather dispatcher through ZeroComputeMoELayer) equals moe_train's own MoELayer at the same weights for
    null_kind identity and constant (outputs, input gradient, every parameter gradient including the constant
    vectors and the balancing terms), in both gate conventions (renormalised; raw probabilities with a scaling
    factor), and the dispatcher's rows are the FFN assignments only;
  * a whole MLA + shared-expert GPTModel: our top-k router (and dispatcher) equals Megatron's own TopKRouter at the
    same weights (loss and every gradient), for softmax scores, DeepSeek-V3 routing (sigmoid scores, group-limited
    top-k, selection-only expert bias, scaling factor) and DeepSeek-V2 routing (raw softmax, group-limited);
  * in that model, an identity-kind MoE layer equals moe_train's layer on the same input (output and the layer's
    parameter gradients for the same upstream gradient).
Needs megatron-core; Megatron's CUDA-only and Transformer-Engine-only calls are patched for the tests only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.model.moe_layer import MoELayer as OurMoELayer  # noqa: E402
from moe_train.parallel.megatron import (  # noqa
    VariableKMoELayer,
    VariableKRouter,
    ZeroComputeMoELayer,
    adamoe,
    compat,
    get_gpt_decoder_block_spec,
    router_state_from_moe_train,
    sequential_mlp_state_from_moe_train,
    topk,
)

import megatron_workers as W  # noqa: E402

TOL = 1e-5
D, FF = W.D, W.FF


@pytest.fixture(scope="module")
def pg():
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


def _swiglu_state(gate, up, down) -> dict:
    """moe_train SwiGLU weights (gate_proj / up_proj / down_proj, or their gradients) as Megatron's
    SharedExpertMLP state: fc1 = [gate; up] rows, fc2 = down."""
    return {"linear_fc1.weight": torch.cat([gate, up]).detach().clone(), "linear_fc2.weight": down.detach().clone()}


def _shared_state(mlp, grad: bool = False) -> dict:
    ws = [getattr(mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")]
    return _swiglu_state(*[w.grad if grad else w for w in ws])


def _expert_grads(experts) -> dict:
    return sequential_mlp_state_from_moe_train(types.SimpleNamespace(
        w_gate=experts.w_gate.grad, w_up=experts.w_up.grad, w_down=experts.w_down.grad), range(4))


def _moe_train_layer(kind: str, norm: bool, scale: float) -> OurMoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, null_kind=kind, norm_topk_prob=norm,
                    routed_scaling_factor=scale)
    layer = OurMoELayer(ModelConfig(hidden_size=D, intermediate_size=FF, n_shared_experts=1, moe=moe))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        layer.router.null_gate.weight[:, 1] = 10  # tokens with feature 1 = 5 pick only null experts
    return layer


def _load(layer, mt) -> None:
    layer.router.load_state_dict(router_state_from_moe_train(mt.router), strict=True)
    layer.experts.load_state_dict(sequential_mlp_state_from_moe_train(mt.experts, range(4)), strict=True)
    layer.shared_experts.load_state_dict(_shared_state(mt.shared_experts), strict=True)


def _grads(module) -> dict:
    return {n: p.grad for n, p in module.named_parameters()}


# pairwise cover of kind x dispatcher (ours / Megatron's allgather) x gate convention (renormalised / raw, scaled)
@pytest.mark.parametrize("kind, ours, norm", [("identity", True, True), ("identity", False, False),
                                              ("constant", True, False), ("constant", False, True)])
def test_null_kinds_in_megatron_layer_equal_moe_train_layer(pg, kind, ours, norm):
    scale = 1.0 if norm else 2.0
    mt = _moe_train_layer(kind, norm, scale)
    coef, zcoef = 0.01, 1e-3
    cfg = W.make_config(moe_router_topk=2, moe_aux_loss_coeff=coef, moe_z_loss_coeff=zcoef,
                        moe_shared_expert_intermediate_size=FF, moe_router_pre_softmax=not norm,
                        moe_router_topk_scaling_factor=None if norm else scale)
    routing = adamoe(4, top_k=3, null_kind=kind, dispatcher="variable_k" if ours else "megatron")
    cls = VariableKMoELayer if ours else ZeroComputeMoELayer
    layer = cls(cfg, W.moe_submodules(VariableKRouter.builder(routing)), layer_number=1, pg_collection=pg)
    layer.set_layer_number(1)
    _load(layer, mt)
    g = torch.Generator().manual_seed(4)
    x, proj = torch.randn(8, 2, D, generator=g), torch.randn(8, 2, D, generator=g)
    x[..., 1] = 0.0
    x[::3, :, 1] = 5.0
    T = 16
    xr = x.reshape(1, T, D).clone().requires_grad_(True)
    y_ref, plan = mt(xr)
    ((y_ref * proj.reshape(1, T, D)).sum() + coef * plan.aux_loss + zcoef * plan.z_loss).backward()

    xx = x.clone().requires_grad_(True)
    y, bias = layer(xx)
    assert bias is None
    (y * proj).sum().backward()
    assert W.relerr(y.reshape(1, T, D), y_ref) <= TOL and W.relerr(xx.grad.reshape(1, T, D), xr.grad) <= TOL
    grads, ref = _grads(layer), _grads(mt)
    pairs = {"router.weight": ref["router.gate.weight"], "router.null_weight": ref["router.null_gate.weight"]}
    if kind == "constant":
        pairs["router.null_values"] = ref["router.null_values"]
    pairs.update({f"shared_experts.{k}": v for k, v in _shared_state(mt.shared_experts, grad=True).items()})
    pairs.update({f"experts.{k}": v for k, v in _expert_grads(mt.experts).items()})
    assert set(pairs) == set(grads), set(pairs) ^ set(grads)
    bad = {n: W.relerr(grads[n], r) for n, r in pairs.items() if not W.relerr(grads[n], r) <= TOL}
    assert not bad, bad
    all_null = (plan.expert_idx_TK < 0).all(1)
    assert all_null.sum() > 0  # tokens with only null picks: no row, yet (identity / constant) an output
    if ours:
        assert layer.token_dispatcher.last.rows_sent == int((plan.expert_idx_TK >= 0).sum())


# ----------------------------------------------------------------------------------------------------------
# a DeepSeek-style GPTModel: multi-latent attention, shared experts, a dense first layer


@contextlib.contextmanager
def _mla_on_cpu(monkeypatch):
    """Megatron 0.16.1 builds MLA on CPU with two test-side patches (docs/megatron.md): multi_latent_attention's
    HAVE_TE is True without Transformer Engine (its extension module imports, TELinear is a mock), and the local
    DotProductAttention does not take MLA's k_channels / v_channels (it needs kv_channels = v_head_dim instead)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import multi_latent_attention as mla

    monkeypatch.setattr(mla, "HAVE_TE", False)
    monkeypatch.setattr(tp_random.CudaRNGStatesTracker, "fork",  # attention dropout RNG: CUDA-only
                        lambda self, name="model-parallel-rng": contextlib.nullcontext())
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()


def _mla_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLACoreAttention(DotProductAttention):
        """Megatron's local attention; MLA's k_channels / v_channels are read from the config instead."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    return MLACoreAttention


def _mla_config(**kw):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    base = dict(num_layers=2, hidden_size=D, num_attention_heads=3, num_moe_experts=4, moe_router_topk=2,
                moe_ffn_hidden_size=FF, ffn_hidden_size=24, gated_linear_unit=True, activation_func=F.silu,
                add_bias_linear=False, moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
                params_dtype=torch.float32, bf16=False, moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=0.01, moe_z_loss_coeff=None, multi_latent_attention=True, q_lora_rank=None,
                kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2, v_head_dim=6, kv_channels=6,
                moe_shared_expert_intermediate_size=FF, moe_layer_freq=[0, 1], normalization="RMSNorm",
                rope_type="rope", attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return MLATransformerConfig(**base)


def _gpt(cfg, routing):
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    spec = (gpt_layer_specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False) if routing is None
            else get_gpt_decoder_block_spec(cfg, routing, use_transformer_engine=False))
    core = _mla_core_attention()
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = core
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=32, max_sequence_length=16,
                    position_embedding_type="rope")


def _batch():
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None].expand(2, 8)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril().logical_not()
    return ids, pos, mask


DEEPSEEK_ROUTERS = {
    "softmax": {},
    # DeepSeek-V3: sigmoid scores (always renormalised by Megatron), 2 groups of 2 experts, the best group kept
    # (scored by its two best, topk // group_topk = 2), selection-only expert bias, scaling factor. No aux loss:
    # Megatron's counts f from a plain top-k of the scores (no bias, no groups), ours from the actual selections.
    "v3_sigmoid_groups_bias": dict(moe_router_score_function="sigmoid", moe_router_num_groups=2,
                                   moe_router_group_topk=1, moe_router_enable_expert_bias=True,
                                   moe_router_topk_scaling_factor=2.5, moe_aux_loss_coeff=0.0),
    # DeepSeek-V2: softmax probabilities kept raw (pre_softmax), 3 of 8 experts in 4 groups of 2, the 2 best groups
    # kept (scored by their best expert, topk // group_topk = 1), scaling factor
    "v2_softmax_groups": dict(num_moe_experts=8, moe_router_topk=3, moe_router_pre_softmax=True,
                              moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=16.0,
                              moe_aux_loss_coeff=0.0),
}


@pytest.mark.parametrize("case", list(DEEPSEEK_ROUTERS))
def test_mla_shared_expert_model_our_router_equals_megatrons(pg, monkeypatch, case):
    cfg = _mla_config(**DEEPSEEK_ROUTERS[case])
    ids, pos, mask = _batch()
    with _mla_on_cpu(monkeypatch):
        models = {"megatron": _gpt(cfg, None), "ours": _gpt(cfg, topk())}
        state = models["megatron"].state_dict()
        if cfg.moe_router_enable_expert_bias:  # a bias that changes selections (Megatron's is trained, not learned)
            key = next(k for k in state if k.endswith("router.expert_bias"))
            state[key] = torch.tensor([0.3, -0.2, 0.0, 0.25])
        seen = {}
        models["ours"].decoder.layers[1].mlp.register_forward_pre_hook(
            lambda module, args: seen.__setitem__("x", args[0].detach()))
        out = {}
        for name, model in models.items():
            model.load_state_dict(state, strict=True)
            mlp = model.decoder.layers[1].mlp
            assert type(mlp.router).__name__ == ("TopKRouter" if name == "megatron" else "VariableKRouter")
            assert type(model.decoder.layers[0].self_attention).__name__ == "MLASelfAttention"
            loss = model(ids, pos, mask, labels=ids).mean()
            loss.backward()
            counts = None if mlp.router.local_tokens_per_expert is None else mlp.router.local_tokens_per_expert
            out[name] = (loss.item(), _grads(model), counts)
        if case != "softmax":  # the bias / the groups did change selections (against a plain top-k of the scores)
            router = models["ours"].decoder.layers[1].mlp.router
            x_TD = seen["x"].reshape(-1, D)
            with torch.no_grad():
                _, routing_map = router(x_TD)
                logits = x_TD @ router.weight.t()
                scores = torch.sigmoid(logits) if cfg.moe_router_score_function == "sigmoid" else logits.softmax(-1)
                plain = scores.topk(cfg.moe_router_topk, dim=-1).indices
            plain_map = torch.zeros_like(routing_map).scatter_(1, plain, True)
            assert (routing_map != plain_map).any(1).sum() > 0
    (l_ref, g_ref, c_ref), (l_ours, g_ours, c_ours) = out["megatron"], out["ours"]
    assert abs(l_ref - l_ours) <= 1e-6
    assert set(g_ref) == set(g_ours)
    bad = {n: W.relerr(g_ours[n], g_ref[n]) for n in g_ref if not W.relerr(g_ours[n], g_ref[n]) <= TOL}
    assert not bad, bad
    if c_ref is not None:  # the token counts Megatron's finalize_model_grads updates the bias from
        assert torch.equal(c_ours, c_ref)


def test_identity_layer_inside_mla_model_equals_moe_train_layer(pg, monkeypatch):
    cfg = _mla_config(moe_aux_loss_coeff=0.0)
    mt = _moe_train_layer("identity", True, 1.0)
    ids, pos, mask = _batch()
    seen = {}
    with _mla_on_cpu(monkeypatch):
        model = _gpt(cfg, adamoe(4, top_k=3, null_kind="identity"))
        mlp = model.decoder.layers[1].mlp
        assert isinstance(mlp, VariableKMoELayer)
        _load(mlp, mt)

        def keep_input(module, args):
            seen["x"] = args[0].detach()

        def keep_output(module, args, output):
            seen["y"] = output[0].detach()
            output[0].register_hook(lambda g: seen.__setitem__("g", g.detach()))

        mlp.register_forward_pre_hook(keep_input)
        mlp.register_forward_hook(keep_output)
        model(ids, pos, mask, labels=ids).mean().backward()
    S, B, _ = seen["x"].shape
    x_TD = seen["x"].reshape(1, S * B, D)
    y_ref, plan = mt(x_TD)
    (y_ref * seen["g"].reshape(1, S * B, D)).sum().backward()
    assert W.relerr(seen["y"].reshape(1, S * B, D), y_ref) <= TOL
    assert (plan.null_idx_TK >= 0).sum() > 0  # identity picks happened inside the model
    grads = _grads(mlp)
    assert W.relerr(grads["router.weight"], mt.router.gate.weight.grad) <= TOL
    assert W.relerr(grads["router.null_weight"], mt.router.null_gate.weight.grad) <= TOL
    assert W.relerr(grads["shared_experts.linear_fc2.weight"], mt.shared_experts.down_proj.weight.grad) <= TOL
    assert all(W.relerr(grads[f"experts.{k}"], v) <= TOL for k, v in _expert_grads(mt.experts).items())


def test_null_kind_validation(pg):
    cfg = W.make_config()
    with pytest.raises(ValueError, match="null_kind"):
        VariableKRouter.builder(adamoe(4, top_k=3, null_kind="copy"))(config=cfg, pg_collection=pg)
    router = VariableKRouter.builder(adamoe(4, top_k=3, null_kind="constant"))(config=cfg, pg_collection=pg)
    assert router.null_values.shape == (4, D) and (router.null_values == 0).all()
    # a top-k checkpoint loads: the constant vectors keep their initialisation (as the allocator does)
    topk_router = VariableKRouter.builder(topk())(config=cfg, pg_collection=pg)
    router.load_state_dict(topk_router.state_dict(), strict=True)
    assert dataclasses.replace(adamoe(4), null_kind="identity").moe_config(cfg).null_kind == "identity"
    # with Megatron's own dispatcher the spec installs the layer that adds the null term
    from megatron.core.models.gpt import gpt_layer_specs

    from moe_train.parallel.megatron import with_variable_k
    from moe_train.parallel.megatron.compat import moe_spec_parts

    base = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=4)
    for kind, cls in (("zero", "ZeroComputeMoELayer"), ("identity", "ZeroComputeMoELayer")):
        spec = with_variable_k(base, adamoe(4, top_k=3, null_kind=kind, dispatcher="megatron"))
        assert moe_spec_parts(spec.submodules.mlp)[0].__name__ == cls  # 0.16 ModuleSpec or 0.19 builder
