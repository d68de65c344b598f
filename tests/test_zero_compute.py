"""Zero-computation expert kinds (model.moe.null_kind: zero / identity / constant; docs/zero_compute.md).

  * identity and constant against a plain per-token float64 reference (loops over tokens and picks, no plan,
    no permutation): layer output and the gradients of the input, the true and null gates, the constant vectors and
    the experts, for both gate conventions (renormalised over all picks / raw probabilities);
  * null slots are never dispatched: the rows reaching the expert GEMMs equal the true assignments;
  * balancing terms, the budget controller and the statistics count every kind as non-FFN;
  * capacity drops, HF export refusal, AdaMoE conversion refusal, config validation;
  * ep 2 and 4 (tests/zero_compute_workers.py, one gloo spawn per world size): rows and bytes sent equal the FFN
    assignments exactly at several shares of identity / constant picks, outputs and every gradient equal the
    single-process run, and the FSDP2-parallel model carries the constant vectors as ordinary dense parameters.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ConfigError, ModelConfig, MoEConfig, validate_moe
from moe_train.model.moe_layer import MoELayer
from moe_train.routing.zero_compute import null_expert_output, split_null_slots

import zero_compute_workers as W

# A float64 layer against the float64 reference; the router's probabilities (hence every gate weight) are fp32 by
# design (routing/null_experts.py), so errors are fp32 rounding of the weights: relative to max(1, |ref|).
TOL = 2e-6


def relerr(a, b) -> float:
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _layer(kind, norm=True, seed=0, E=4, Z=4, K=3, dtype=torch.float64, **moe):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=8, intermediate_size=12, moe=MoEConfig(
        router="null_experts", num_experts=E, num_null_experts=Z, top_k=K, norm_topk_prob=norm, null_kind=kind,
        gemm_backend="loop", **moe))
    layer = MoELayer(cfg).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
    return layer


def reference(layer, x_TD):
    """Per token, float64: softmax over E + Z logits, top-k by probability, weights by the kind's rule, then
    y_t = sum_true w E_i(x_t) + sum_null w E_null(x_t). Uses the layer's parameters (as float64 leaves)."""
    r, ex = layer.router, layer.experts
    E, Z, K = r.num_experts, r.num_null, r.top_k
    kind, norm = r.null_kind, r.norm_topk_prob
    out = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        z = torch.cat([r.gate.weight @ x, r.null_gate.weight @ x])
        p = torch.softmax(z, dim=0)
        picks = sorted(range(E + Z), key=lambda i: -p[i].item())[:K]
        w = {i: p[i] for i in picks}
        if norm:
            keep = picks if kind != "zero" else [i for i in picks if i < E]
            total = sum(w[i] for i in keep) if keep else 1.0
            w = {i: w[i] / total for i in keep}
        y = torch.zeros_like(x)
        for i, wi in w.items():
            if i < E:
                h = F.silu(x @ ex.w_gate[i]) * (x @ ex.w_up[i])
                y = y + wi * (h @ ex.w_down[i])
            elif kind == "identity":
                y = y + wi * x
            elif kind == "constant":
                y = y + wi * r.null_values[i - E]
        out.append(y)
    return torch.stack(out)


def _x(T=40, D=8, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(layer, x, proj, fn):
    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = fn(xx)
    (y * proj).sum().backward()
    return y.detach(), xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["identity", "constant", "zero"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm_all_picks", "raw_probs"])
def test_layer_equals_float64_per_token_reference(kind, norm):
    layer = _layer(kind, norm)
    x, proj = _x(), _x(seed=2)
    y, gx, grads = _grads(layer, x, proj, lambda xx: layer(xx[None])[0][0])
    y_ref, gx_ref, grads_ref = _grads(layer, x, proj, lambda xx: reference(layer, xx))
    assert relerr(y, y_ref) <= TOL and relerr(gx, gx_ref) <= TOL
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert relerr(grads[name], grads_ref[name]) <= TOL, name
    expected = {"router.gate.weight", "router.null_gate.weight", "experts.w_gate"}
    if kind == "constant":
        expected.add("router.null_values")
    assert expected <= set(grads)  # gradients reach gates (true and null), experts and the constants
    plan = layer.router(x)
    null_TK = (plan.expert_idx_TK < 0)
    assert 0 < null_TK.sum() < null_TK.numel()  # both kinds of picks were exercised
    if kind == "zero":
        assert plan.null_weight_TK is None
    else:
        assert grads["router.null_gate.weight"].abs().max() > 0
        assert torch.equal(plan.null_idx_TK >= 0, null_TK) and (plan.weight_TK[null_TK] == 0).all()
        if norm:  # every pick contributes: the k weights sum to one
            total = plan.weight_TK.sum(1) + plan.null_weight_TK.sum(1)
            assert (total - 1).abs().max() <= 1e-6


def test_all_null_tokens_get_their_null_term_and_no_row():
    layer = _layer("identity")
    with torch.no_grad():
        layer.router.null_gate.weight[:, 0] = 50.0  # tokens with feature 0 = 1 pick only null experts
    x = _x(T=12)
    x[:, 0] = 0.0
    x[::2, 0] = 1.0
    seen = []
    orig = layer.experts.forward
    layer.experts.forward = lambda x_ND, counts_E: (seen.append(x_ND.shape[0]), orig(x_ND, counts_E))[1]
    y, plan = layer(x[None])
    all_null = (plan.expert_idx_TK < 0).all(1)
    assert all_null[::2].all() and all_null.sum() < 12
    # identity, normalised: the null weights of an all-null token sum to one, so it outputs x itself
    assert (y[0][all_null] - x[all_null]).abs().max() <= 1e-6
    assert seen == [int((plan.expert_idx_TK >= 0).sum())]  # the expert GEMMs saw only the true assignments


def test_pure_functions_by_hand():
    w = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    idx = torch.tensor([[1, 5, 4]])  # E = 4: expert 1, nulls 1 and 0
    e_idx, e_w, n_idx, n_w = split_null_slots(w, idx, 4, "identity", True)
    assert e_idx.tolist() == [[1, -1, -1]] and n_idx.tolist() == [[-1, 1, 0]]
    assert torch.allclose(e_w, torch.tensor([[0.5, 0, 0]], dtype=torch.float64))
    assert torch.allclose(n_w, torch.tensor([[0, 0.3, 0.2]], dtype=torch.float64))
    e_idx, e_w, n_idx, n_w = split_null_slots(w, idx, 4, "zero", True)
    assert n_idx is None and torch.allclose(e_w, torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    v = torch.tensor([[1.0, 2.0], [10.0, 20.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    out = null_expert_output(x, torch.tensor([[-1, 1, 0]]), torch.tensor([[0, 0.3, 0.2]], dtype=torch.float64),
                             "constant", v)
    assert torch.allclose(out, torch.tensor([[0.3 * 10 + 0.2 * 1, 0.3 * 20 + 0.2 * 2]], dtype=torch.float64))
    out = null_expert_output(x, torch.tensor([[-1, 1, 0]]), torch.tensor([[0, 0.3, 0.2]], dtype=torch.float64),
                             "identity")
    assert torch.allclose(out, 0.5 * x)
    with pytest.raises(ValueError, match="null_values"):
        null_expert_output(x, n_idx if n_idx is not None else idx, w, "constant")


def test_balancing_budget_and_statistics_count_nulls_as_non_ffn():
    """The aux loss, true experts per token and the budget controller see exactly the FFN picks, whatever the kind:
    the same router weights give the same selections, counts and loss under zero / identity / constant."""
    plans = {}
    for kind in ("zero", "identity", "constant"):
        layer = _layer(kind, aux_loss_coef=0.01, target_true_experts=1.5, dtype=torch.float32)
        if kind != "zero":  # the same gates (the constant kind draws its vectors too)
            layer.router.load_state_dict(plans["zero"][0].router.state_dict(), strict=False)
        plans[kind] = (layer, layer.router(_x().float()))
    z_layer, z_plan = plans["zero"]
    for layer, plan in plans.values():
        assert torch.equal(plan.expert_idx_TK, z_plan.expert_idx_TK) and torch.equal(plan.counts_E, z_plan.counts_E)
        assert plan.aux_loss.item() == z_plan.aux_loss.item()
        # the aux loss by hand: null counts in one averaged bucket, f over all k picks
        E, Z, K, T = 4, 4, 3, plan.expert_idx_TK.shape[0]
        c = plan.counts_E.double().tolist() + [(T * K - plan.counts_E.sum().item()) / Z] * Z
        P = plan.probs_TN.double().mean(0)
        expected = (E + Z) * sum(ci / (T * K) * P[i].item() for i, ci in enumerate(c))
        assert abs(plan.aux_loss.item() - expected) <= 1e-6
        measured = plan.true_experts_per_token_T.mean().item()
        assert measured == pytest.approx((plan.expert_idx_TK >= 0).sum().item() / T, abs=1e-6)
        layer.router.update_budget(measured)  # a PI step on the TRUE experts: the same for every kind
        assert layer.router.null_bias.item() == pytest.approx(0.01 * (measured - 1.5) + 0.002 * (measured - 1.5))
    from moe_train.model.flops import forward_flops_per_token

    cfgs = {k: ModelConfig(moe=MoEConfig(router="null_experts", num_null_experts=4, top_k=3, null_kind=k))
            for k in ("zero", "identity", "constant")}
    flops = {k: forward_flops_per_token(c, 1.5, 64) for k, c in cfgs.items()}
    assert flops["identity"] == flops["constant"] == flops["zero"]  # null picks: zero expert FLOPs


def test_capacity_drops_keep_null_weights():
    layer = _layer("identity", capacity_factor=0.5, dtype=torch.float32)
    x = _x().float()
    y, plan = layer(x[None])
    assert plan.extras["capacity"]["num_dropped"] > 0
    raw = layer.router(x)
    kept = plan.expert_idx_TK >= 0
    # dropped true picks lose their term; kept true and all null weights are the router's own (no renormalising)
    assert torch.equal(plan.weight_TK[kept], raw.weight_TK[kept]) and torch.equal(plan.null_weight_TK,
                                                                                    raw.null_weight_TK)
    assert (plan.weight_TK[~kept] == 0).all()


def test_config_validation_and_refusals(tmp_path):
    validate_moe(MoEConfig(router="null_experts", num_null_experts=2, top_k=2, null_kind="constant"))
    with pytest.raises(ConfigError, match="null_kind.*one of"):
        validate_moe(MoEConfig(router="null_experts", num_null_experts=2, null_kind="copy"))
    with pytest.raises(ConfigError, match="needs router: null_experts"):
        validate_moe(MoEConfig(router="topk", null_kind="identity"))
    with pytest.raises(ConfigError, match="num_null_experts >= 1"):
        validate_moe(MoEConfig(router="null_experts", num_null_experts=0, null_kind="identity"))
    from moe_train.config import Config, validate

    cfg = Config()
    cfg.model.moe = MoEConfig(router="null_experts", num_null_experts=4, top_k=3, null_kind="constant")
    cfg.train.export_hf = True
    with pytest.raises(ConfigError, match="export_hf.*constant"):
        validate(cfg)
    from moe_train.io.hf import to_hf
    from moe_train.model import build_model

    model = build_model(ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                    num_kv_heads=1, moe=cfg.model.moe))
    # to_hf itself writes constant null experts, with the modeling code that runs them (io/hf_remote; tests/
    # test_hf_export.py checks transformers' logits)
    hf = json.loads((to_hf(model, tmp_path / "hf") / "config.json").read_text())
    assert hf["model_type"] == "moe_train" and hf["moe_train"]["null_kind"] == "constant"
    from moe_train.io.convert import check_conversion

    for kind in ("identity", "constant"):
        with pytest.raises(ValueError, match="function-preserving"):
            check_conversion(MoEConfig(num_experts=8, top_k=2), 16, 4, null_kind=kind)


def test_constant_kind_checkpoint_roundtrip(tmp_path):
    """model.pt carries the constant vectors (and the kind)."""
    from moe_train.io.load import load_any
    from moe_train.io.model_file import save_model
    from moe_train.model import build_model

    mcfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       moe=MoEConfig(router="null_experts", num_null_experts=4, top_k=3, null_kind="constant"))
    model = build_model(mcfg)
    with torch.no_grad():
        model.layers[0].moe.router.null_values.normal_()
    save_model(model, tmp_path / "model.pt")
    loaded = load_any(tmp_path / "model.pt")
    assert loaded.config.moe.null_kind == "constant"
    assert torch.equal(loaded.layers[0].moe.router.null_values, model.layers[0].moe.router.null_values)
    ids = torch.randint(0, 16, (2, 6))
    assert torch.equal(loaded(ids), model(ids))


def _train_cfg(out, steps: int):
    from moe_train.config import Config, DataConfig, TrainConfig

    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, null_kind="constant",
                    aux_loss_coef=0.01, target_true_experts=1.5, capacity_factor=2.0)
    return Config(model=ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                                    num_kv_heads=1, max_seq_len=16, moe=moe),
                  train=TrainConfig(steps=steps, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0,
                                    schedule="constant", log_every=100, checkpoint_every=2, grad_accum_steps=2,
                                    activation_checkpointing=True, tensorboard=False, out_dir=str(out)),
                  data=DataConfig(num_sequences=16, val_sequences=2))


def test_constant_kind_trains_and_resumes_bit_for_bit(tmp_path):
    """The trainer with constant nulls, a compute budget, capacity, accumulation and activation checkpointing:
    the constant vectors learn, and a run resumed from its step-2 DCP checkpoint ends where the uninterrupted run
    ends (vectors, budget bias, losses)."""
    import json

    from moe_train.train.trainer import train

    train(_train_cfg(tmp_path / "once", 3))  # checkpoints at steps 2 and 3
    cfg = _train_cfg(tmp_path / "resumed", 3)
    cfg.train.resume_from = str(tmp_path / "once" / "checkpoints" / "step_00000002")
    train(cfg)  # continues from the uninterrupted run's step-2 checkpoint
    sd = {n: torch.load(tmp_path / n / "final" / "model.pt", weights_only=True)["model"]
          for n in ("once", "resumed")}
    keys = [k for k in sd["once"] if k.endswith("router.null_values")]
    assert len(keys) == 2 and all(sd["once"][k].abs().max() > 0 for k in keys)  # learned from 0
    for k in sd["once"]:
        assert torch.equal(sd["once"][k], sd["resumed"][k]), k
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("once", "resumed")}
    assert [r["step"] for r in rows["resumed"] if "loss" in r] == [3]
    step3 = {n: next(r for r in rows[n] if r.get("step") == 3 and "loss" in r) for n in rows}
    assert step3["once"]["loss"] == step3["resumed"]["loss"]


def test_bf16_autocast_keeps_the_layer_dtype():
    for kind in ("identity", "constant"):
        layer = _layer(kind, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(_x().float()[None])
        zero = _layer("zero", dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y0, _ = zero(_x().float()[None])
        assert y.dtype == y0.dtype and torch.isfinite(y).all()


def test_identity_kind_round_trips_through_our_hf_folder(tmp_path):
    """A Mixtral-family identity model: to_hf writes the null gate and the MoEConfig (kind included) as extras, and
    from_hf restores the same function (transformers itself would load the top-k model, as for AdaMoE's zero kind;
    LongCat-Flash is the family whose HF format has identity experts)."""
    from moe_train.io.hf import from_hf, to_hf
    from moe_train.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                    num_kv_heads=1, moe=MoEConfig(router="null_experts", num_null_experts=4, top_k=3,
                                                                  null_kind="identity")))
    back = from_hf(to_hf(model, tmp_path / "hf"))
    assert back.config.moe.null_kind == "identity"
    ids = torch.randint(0, 16, (2, 6))
    assert torch.equal(back(ids), model(ids))


# ----------------------------------------------------------------------------------------------------------
# expert parallelism


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    """One 4-rank spawn: ep 2 (two groups of 2 ranks, dp 2 x ep 2) and ep 4 (one group), then the model."""
    return W.spawn("suite", 4, tmp_path_factory.mktemp("zc_ep"))


@pytest.mark.parametrize("ep", [2, 4])
def test_ep_rows_bytes_outputs_and_gradients(ep_results, ep):
    res = ep_results
    for rank, r in enumerate(res):
        for case in (c for c in r["cases"] if c["ep"] == ep):
            tag = f"rank {rank} ep {ep} {case['kind']} share={case['share']}"
            assert case["rows_sent"] == case["ffn_local"], tag  # rows = FFN assignments, never a null pick
            assert case["bytes_sent_remote"] == case["ffn_remote"] * case["row_bytes"], tag
            assert case["recv_counts_PL"] == case["expected_recv_PL"], tag
            bad = {k: v for k, v in case["err"].items() if not v <= W.TOL}
            assert not bad, f"{tag}: {bad}"
            assert case["null_slots"] + case["ffn_local"] == case["slots"], tag
    groups = [list(range(4))] if ep == 4 else [[0, 1], [2, 3]]
    for group in groups:
        for i, case in enumerate(res[group[0]]["cases"]):
            if case["ep"] != ep:
                continue
            cases = [res[r]["cases"][i] for r in group]
            # nothing lost or duplicated in the group; the exact FFN share of the forced picks
            assert sum(c["rows_sent"] for c in cases) == sum(c["rows_received"] for c in cases)
            assert sum(c["null_slots"] for c in cases) == round(sum(c["slots"] for c in cases) * case["share"])
    assert {c["share"] for c in res[0]["cases"] if c["ep"] == ep} == set(W.SHARES)
    assert {c["kind"] for c in res[0]["cases"] if c["ep"] == ep} == set(W.KINDS)
    print(f"ep {ep} rank 0 (kind, share, FFN rows sent, remote bytes):",
          [(c["kind"], c["share"], c["rows_sent"], c["bytes_sent_remote"]) for c in res[0]["cases"] if c["ep"] == ep])


def test_ep_model_carries_constant_vectors_as_dense_parameters(ep_results):
    """dp 2 x ep 2, FSDP2: router.null_values is an ordinary DTensor shard over all ranks, and every gradient
    (constants included), the loss and the state dict equal the single-process model."""
    for rank, r in enumerate(ep_results):
        m = r["model"]
        assert m["null_values_is_dtensor"] and m["loss_err"] <= W.TOL
        bad = {k: v for k, v in m["grad_err"].items() if not v <= W.TOL * max(m["grad_scale"][k], 1e-6)}
        assert not bad, f"rank {rank}: {bad}"
        assert m["null_values_grad_scale"] > 0
