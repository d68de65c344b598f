"""Top-p routing (moe_train/routing/top_p.py) against hand computations and plain-torch references: the expert sets
and gates of a few written-out tokens, the entropy ("dynamic") loss, the MoE layer output, the cap k_max, config
validation, top-k -> top-p conversion on load, the trainer (metrics, FLOPs, checkpoint). Expert parallelism (ep = 2
and 4 against one process) runs in tests/test_ep_parallel.py through the "top_p" case of tests/ep_workers.py."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ConfigError, ModelConfig, MoEConfig, apply_overrides, load_config
from moe_train.model import build_model
from moe_train.model.loss import routing_losses
from moe_train.model.moe_layer import MoELayer
from moe_train.routing import TopPRouter, build_router
from moe_train.routing.top_p import top_p_keep

import ep_workers as W

# Router probabilities of three tokens over 4 experts, written out, and the expected picks (best first).
PROBS = [[0.10, 0.60, 0.25, 0.05],   # p=0.4: 0.60 reaches it -> [1]; p=0.7: 0.60 + 0.25 = 0.85 -> [1, 2]
         [0.30, 0.20, 0.25, 0.25],   # p=0.4: 0.30, 0.55 -> [0, 2] (tie 2/3: lower index first); p=0.7: [0, 2, 3]
         [0.05, 0.05, 0.05, 0.85]]   # both: [3]
EXPECTED = {0.4: [[1], [0, 2], [3]], 0.7: [[1, 2], [0, 2, 3], [3]]}


def _router_with_probs(p: float, norm: bool, k_max=None) -> tuple[TopPRouter, torch.Tensor]:
    """A router whose gate maps one-hot token t to logits log PROBS[t] (softmax gives PROBS back)."""
    cfg = MoEConfig(router="top_p", num_experts=4, top_k=2, top_p=p, top_p_renormalize=norm, k_max=k_max)
    r = build_router(3, cfg)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor(PROBS, dtype=torch.float64).log().T.float())
    return r, torch.eye(3)


@pytest.mark.parametrize("p", [0.4, 0.7])
@pytest.mark.parametrize("norm", [True, False])
def test_hand_computed_expert_sets_and_gates(p, norm):
    r, x = _router_with_probs(p, norm)
    plan = r(x)
    assert plan.expert_idx_TK.shape == (3, 4)  # Kmax = num_experts slots, unused ones -1
    for t, want in enumerate(EXPECTED[p]):
        got = plan.expert_idx_TK[t].tolist()
        assert got == want + [-1] * (4 - len(want)), (t, got)
        raw = [PROBS[t][e] for e in want]
        gates = [w / sum(raw) for w in raw] if norm else raw
        assert plan.weight_TK[t, :len(want)].tolist() == pytest.approx(gates, abs=1e-6)
        assert plan.weight_TK[t, len(want):].abs().sum() == 0
    counts = [sum(e == i for row in EXPECTED[p] for e in row) for i in range(4)]
    assert plan.counts_E.tolist() == counts
    # the dynamic loss: the mean over the tokens of the router entropy, by hand in float64
    entropy = sum(-sum(q * math.log(q) for q in row) for row in PROBS) / len(PROBS)
    assert float(plan.extras["entropy_loss"].detach()) == pytest.approx(entropy, abs=1e-6)


def test_threshold_reached_exactly_and_cap():
    # dyadic probabilities sum exactly in fp32: a prefix reaching p stops there (the paper's >=)
    sorted_TK = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    assert top_p_keep(sorted_TK, 0.75).tolist() == [[True, True, False, False], [True, True, True, False]]
    assert top_p_keep(sorted_TK, 1.0).tolist() == [[True] * 4, [True] * 4]
    r, x = _router_with_probs(0.7, True, k_max=2)  # token 1 needs 3 experts, capped at 2
    plan = r(x)
    assert plan.expert_idx_TK.tolist() == [[1, 2], [0, 2], [3, -1]]
    assert plan.weight_TK[1].tolist() == pytest.approx([0.30 / 0.55, 0.25 / 0.55], abs=1e-6)


def test_default_gates_are_raw_and_routed_scaling_applies():
    """The paper's gates (raw probabilities) by default, whatever norm_topk_prob says (its default True used to
    renormalise them); routed_scaling_factor multiplies the gates after the renormalisation, as every router's."""
    assert MoEConfig().top_p_renormalize is False
    for norm in (False, True):
        cfg = MoEConfig(router="top_p", num_experts=4, top_p=0.4, norm_topk_prob=True, top_p_renormalize=norm,
                        routed_scaling_factor=2.5)
        r = build_router(3, cfg)
        with torch.no_grad():
            r.gate.weight.copy_(torch.tensor(PROBS, dtype=torch.float64).log().T.float())
        plan = r(torch.eye(3))
        for t, want in enumerate(EXPECTED[0.4]):
            raw = [PROBS[t][e] for e in want]
            gates = [2.5 * w / (sum(raw) if norm else 1.0) for w in raw]
            assert plan.weight_TK[t, :len(want)].tolist() == pytest.approx(gates, abs=1e-6), (norm, t)


def test_entropy_loss_weighted_and_summed_over_layers():
    r, x = _router_with_probs(0.4, True)
    plans = [r(x), r(x[[2, 2, 2]])]
    cfg = MoEConfig(router="top_p", num_experts=4, entropy_loss_coef=0.5)
    want = 0.5 * sum(float(p.extras["entropy_loss"].detach()) for p in plans)
    assert float(routing_losses(plans, cfg)["entropy_loss"].detach()) == pytest.approx(want, rel=1e-6)
    # differentiable in the gate: the loss pushes toward a peaked distribution
    routing_losses(plans, cfg)["entropy_loss"].backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    top = MoELayer(ModelConfig(hidden_size=8, intermediate_size=8, moe=MoEConfig()))
    assert float(routing_losses([top(torch.randn(1, 3, 8))[1]], MoEConfig())["entropy_loss"]) == 0.0


def test_layer_output_equals_per_token_reference():
    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=8, intermediate_size=12, moe=MoEConfig(router="top_p", num_experts=4,
                                                                                  top_p=0.6)))
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_(std=0.5)
    x = torch.randn(1, 16, 8)
    y, plan = layer(x)
    layer.requires_grad_(False)  # the reference below is plain float64 arithmetic on the same weights
    ex = layer.experts
    x64 = x[0].double()
    probs = torch.softmax(x64 @ layer.router.gate.weight.double().T, dim=-1)
    ks = []
    for t in range(16):
        order = sorted(range(4), key=lambda e: (-float(probs[t, e]), e))
        chosen, mass = [], 0.0
        for e in order:  # smallest best-first set whose mass reaches p
            chosen.append(e)
            mass += float(probs[t, e])
            if mass >= 0.6:
                break
        ks.append(len(chosen))
        w = probs[t, chosen]  # the default (top_p_renormalize: false): the raw probabilities, as the paper's gates
        ref = sum(w[i] * (F.silu(x64[t] @ ex.w_gate[e].double()) * (x64[t] @ ex.w_up[e].double()))
                  @ ex.w_down[e].double() for i, e in enumerate(chosen))
        assert torch.allclose(y[0, t].double(), ref, atol=1e-5), t
    assert plan.true_experts_per_token_T.tolist() == ks and len(set(ks)) > 1  # k varies per token


@pytest.mark.parametrize("override,key", [("model.moe.top_p=0", "model.moe.top_p"),
                                          ("model.moe.top_p=1.5", "model.moe.top_p"),
                                          ("model.moe.entropy_loss_coef=-1", "model.moe.entropy_loss_coef"),
                                          ("model.moe.k_max=9", "model.moe.k_max"),
                                          ("model.moe.expert_bias_rate=0.01", "model.moe.expert_bias_rate"),
                                          ("model.moe.top_p_renormalize=1", "model.moe.top_p_renormalize")])
def test_config_validation(override, key):
    cfg = load_config("configs/tiny_top2.yaml", ["model.moe.router=top_p"])
    assert cfg.model.moe.max_slots == 8
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(cfg, [override])
    with pytest.raises(ConfigError, match=r"model\.moe\.top_p_renormalize=True .*only router: top_p"):
        load_config("configs/tiny_top2.yaml", ["model.moe.top_p_renormalize=true"])  # elsewhere it does nothing


def _tiny_cfg(tmp_path, *extra):
    return load_config("configs/tiny_top2.yaml", [
        "model.hidden_size=16", "model.intermediate_size=16", "model.max_seq_len=32", "train.seq_len=32",
        "train.batch_size=4", "train.steps=2", "train.log_every=1", "train.tensorboard=false", "train.warmup_steps=1",
        "data.num_sequences=16", "data.val_sequences=4", "data.corpus=difficulty", f"train.out_dir={tmp_path}",
        *extra])


def test_trainer_metrics_flops_checkpoint_and_conversion_from_topk(tmp_path):
    from moe_train.io.model_file import load_model, save_model
    from moe_train.model.flops import flops_vs_topk
    from moe_train.train.trainer import initial_model, train

    cfg = _tiny_cfg(tmp_path / "run", "model.moe.router=top_p", "model.moe.top_p=0.5",
                    "model.moe.entropy_loss_coef=0.01")
    rec = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = rows[0]
    assert step["entropy_loss"] > 0 and step["loss"] == pytest.approx(
        step["lm_loss"] + step["aux_loss"] + step["z_loss"] + step["entropy_loss"], rel=1e-5)
    assert step["flops_vs_topk"] == pytest.approx(flops_vs_topk(cfg.model, step["true_experts_per_layer"], 32))
    assert 1 <= step["true_experts_per_token"] <= 8
    assert set(rec["val_loss_by_label"]) <= set(rec["val_true_experts_by_label"]) and "recall_16" in rec[
        "val_loss_by_label"]
    model = load_model(tmp_path / "run" / "final" / "model.pt")  # the checkpoint keeps router and threshold
    assert isinstance(model.layers[0].moe.router, TopPRouter) and model.config.moe.top_p == 0.5

    # a top-k checkpoint continued as top-p: the same gate; with p = 1 capped at k_max = top_k it IS the top-k model
    top = build_model(dataclasses.replace(cfg.model, moe=MoEConfig(num_experts=8, top_k=2)))
    save_model(top, tmp_path / "top2.pt")
    # (top_p_renormalize: true matches the source's norm_topk_prob: true; the default raw gates would not)
    conv = initial_model(apply_overrides(cfg, [f"train.init_from={tmp_path / 'top2.pt'}", "model.moe.top_p=1.0",
                                               "model.moe.k_max=2", "model.moe.top_p_renormalize=true"]))
    assert isinstance(conv.layers[0].moe.router, TopPRouter) and conv.config.moe.top_p == 1.0
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(conv(ids), top(ids), rtol=0, atol=1e-6)

    # DeepSeek's routed_scaling_factor is kept: scaled top-2 models, renormalised and raw, continued as top-p
    for norm in (True, False):
        moe = MoEConfig(num_experts=8, top_k=2, routed_scaling_factor=2.5, norm_topk_prob=norm)
        top = build_model(dataclasses.replace(cfg.model, moe=moe))
        save_model(top, tmp_path / f"top2_scaled_{norm}.pt")
        conv = initial_model(apply_overrides(cfg, [f"train.init_from={tmp_path / f'top2_scaled_{norm}.pt'}",
                                                   "model.moe.top_p=1.0", "model.moe.k_max=2",
                                                   f"model.moe.top_p_renormalize={str(norm).lower()}"]))
        assert conv.config.moe.routed_scaling_factor == 2.5 and conv.config.moe.top_p_renormalize is norm
        torch.testing.assert_close(conv(ids), top(ids), rtol=0, atol=1e-6)


def test_ep_layer_case_registered():
    """ep = 2 and 4 against one process run in tests/test_ep_parallel.py (its layer suite covers every
    W.LAYER_CASES entry in the same spawn); here: the case exists and gives several k per token."""
    assert W.LAYER_CASES["top_p"]["router"] == "top_p"
    plan = W._make_layer("top_p", 4, 2).router(W._make_x("top_p", 2))
    assert len(set(plan.true_experts_per_token_T.tolist())) > 1
