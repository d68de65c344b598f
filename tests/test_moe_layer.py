"""The single-process MoE layer against a float64 per-token reference (outputs and gradients), and the invariant
that only true assignments reach the expert GEMMs."""

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.kernels.grouped_gemm import grouped_mm
from moe_train.model.moe_layer import MoELayer

D, FF = 16, 24


def make_layer(seed=0, **moe):
    torch.manual_seed(seed)
    shared = moe.pop("shared", 0)
    cfg = ModelConfig(hidden_size=D, intermediate_size=FF, shared_expert_intermediate_size=shared, moe=MoEConfig(**moe))
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def reference_forward(layer, x_TD, idx_TK, norm):
    """float64, token by token: y_t = sum over t's true slots of w * SwiGLU_e(x_t), weights from the gate logits."""
    r = layer.router
    logits = x_TD @ r.gate.weight.double().T
    if getattr(r, "null_gate", None) is not None:
        logits = torch.cat([logits, x_TD @ r.null_gate.weight.double().T], -1)
    probs = torch.softmax(logits, -1)
    wg, wu, wd = (w.double() for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down))
    out = []
    for t in range(x_TD.shape[0]):
        slots = [e for e in idx_TK[t].tolist() if e >= 0]
        w = torch.stack([probs[t, e] for e in slots]) if slots else probs.new_zeros(0)
        if norm and slots:
            w = w / w.sum()
        y = x_TD.new_zeros(D)
        for wi, e in zip(w, slots):
            y = y + wi * ((F.silu(x_TD[t] @ wg[e]) * (x_TD[t] @ wu[e])) @ wd[e])
        out.append(y)
    y = torch.stack(out)
    if layer.shared_expert is not None:
        s = layer.shared_expert
        h = (F.silu(x_TD @ s.gate_proj.weight.double().T) * (x_TD @ s.up_proj.weight.double().T)) @ s.down_proj.weight.double().T
        y = y + torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.double().T) * h
    return y


CASES = [
    dict(router="topk", num_experts=4, top_k=2),
    dict(router="topk", num_experts=4, top_k=2, norm_topk_prob=False, shared=20),
    dict(router="null_experts", num_experts=4, num_null_experts=4, top_k=3),
    dict(router="null_experts", num_experts=4, num_null_experts=8, top_k=2, norm_topk_prob=False),
]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("case", CASES)
def test_layer_matches_float64_reference_forward_and_gradients(case, backend):
    layer = make_layer(**dict(case, gemm_backend=backend if D % 4 == 0 and FF % 4 == 0 else "loop"))
    norm = layer.router.norm_topk_prob
    x = torch.randn(1, 40, D, requires_grad=True)
    y, plan = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    x64 = x.detach().double().reshape(-1, D).requires_grad_()
    params64 = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    ref_layer = make_layer(**dict(case))  # same structure; parameters replaced by float64 copies of the layer's
    for n, p in ref_layer.named_parameters():
        p.data = params64[n].detach()
        p.requires_grad_(True)
    y64 = reference_forward(ref_layer, x64, plan.expert_idx_TK, norm)
    (y64 * g.double().reshape(-1, D)).sum().backward()

    assert torch.allclose(y.reshape(-1, D).double(), y64, atol=1e-5, rtol=1e-4)
    assert torch.allclose(x.grad.reshape(-1, D).double(), x64.grad, atol=1e-5, rtol=1e-4)
    ref_params = dict(ref_layer.named_parameters())
    for n, p in layer.named_parameters():
        assert p.grad is not None, n
        assert torch.allclose(p.grad.double(), ref_params[n].grad, atol=1e-5, rtol=1e-4), n


def count_gemm_rows(layer):
    rows = []
    layer.experts.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("case", CASES[2:])
def test_expert_gemms_see_exactly_the_true_assignments(case):
    layer = make_layer(**case)
    rows = count_gemm_rows(layer)
    x = torch.randn(2, 50, D)
    _, plan = layer(x)
    true = int((plan.expert_idx_TK >= 0).sum())
    assert rows == [true]
    assert true < 100 * case["top_k"]  # some picks were null: fewer rows than T*k
    assert plan.counts_E.sum().item() == true


def test_all_null_tokens_output_zero():
    layer = make_layer(router="null_experts", num_experts=4, num_null_experts=4, top_k=2)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.null_gate.weight.zero_()
        layer.router.null_gate.weight[:, 0] = 5.0  # a large first feature makes every null logit win
    x = torch.randn(1, 30, D)
    x[0, :10, 0] = 10.0
    y, plan = layer(x)
    assert (plan.expert_idx_TK[:10] == -1).all()
    assert y[0, :10].abs().max() == 0
    assert y[0, 10:].abs().sum() > 0


def test_zero_rows_and_empty_experts():
    layer = make_layer(router="null_experts", num_experts=4, num_null_experts=4, top_k=2)
    with torch.no_grad():
        layer.router.null_gate.weight.fill_(0.0)
        layer.router.gate.weight.fill_(0.0)
        layer.router.null_gate.weight[:, 0] = 100.0
    x = torch.zeros(1, 8, D, requires_grad=True)
    with torch.no_grad():
        x[..., 0] = 1.0
    y, plan = layer(x)
    assert plan.counts_E.sum() == 0
    y.sum().backward()
    assert y.abs().sum() == 0
    assert layer.experts.w_gate.grad.abs().sum() == 0


def test_grouped_mm_backends_agree_with_loop():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)
    a = grouped_mm(x, w, counts, "grouped_mm")
    b = grouped_mm(x, w, counts, "loop")
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.sum(), (x, w))
    gb = torch.autograd.grad(b.sum(), (x, w))
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(ga, gb))
    with pytest.raises(ValueError, match="multiples of 4"):
        grouped_mm(torch.randn(3, 6), torch.randn(1, 6, 8), torch.tensor([3]), "grouped_mm")
