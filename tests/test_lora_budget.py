"""LoRA (attention and stacked experts) against a dense reference; the compute-budget controller's closed loop."""

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model import build_model
from moe_train.model.experts import GroupedExperts
from moe_train.model.lora import LoRAGroupedExperts, LoRALinear, apply_lora
from moe_train.routing import NullExpertRouter


@torch.no_grad()
def merge_lora(model):
    """Folds every LoRA delta into its base weight and restores plain modules, in place (the library merges state
    dicts instead: moe_train.model.lora.merge_lora_state_dict)."""
    for layer in model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mod = getattr(attn, name)
            if isinstance(mod, LoRALinear):
                mod.base.weight += (mod.lora_B @ mod.lora_A) * mod.scale
                setattr(attn, name, mod.base)
        ex = layer.moe.experts
        if isinstance(ex, LoRAGroupedExperts):
            plain = GroupedExperts.__new__(GroupedExperts)
            torch.nn.Module.__init__(plain)
            plain.num_experts, plain.backend, plain.ep_shard = ex.num_experts, ex.backend, ex.ep_shard
            for name in ("gate", "up", "down"):
                w = getattr(ex, f"w_{name}")
                w += torch.bmm(getattr(ex, f"lora_{name}_A"), getattr(ex, f"lora_{name}_B")) * ex.scale
                setattr(plain, f"w_{name}", w)
            layer.moe.experts = plain
    return model


def tiny(router="null_experts"):
    torch.manual_seed(0)
    moe = MoEConfig(router=router, num_experts=4, num_null_experts=4 if router == "null_experts" else 0, top_k=2)
    return build_model(ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, moe=moe))


def test_lora_starts_at_base_then_merges_to_the_same_function():
    model = tiny()
    ids = torch.randint(0, 64, (2, 12))
    base = model(ids)
    apply_lora(model, rank=3, alpha=6.0)
    assert torch.allclose(model(ids), base, atol=1e-6)  # B = 0 at the start
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and ("_B" in n or n.endswith("lora_B")):
                p.normal_(std=0.05)
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model(ids), adapted, atol=1e-5)


def test_lora_expert_delta_matches_dense_per_expert_reference():
    model = tiny("topk")
    apply_lora(model, rank=2, alpha=2.0, targets=("experts",))
    ex = model.layers[0].moe.experts
    assert isinstance(ex, LoRAGroupedExperts)
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            getattr(ex, f"lora_{name}_B").normal_()
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.randn(6, 32, dtype=torch.float64)
    y = ex.double()(x, counts)
    rows = torch.repeat_interleave(torch.arange(4), counts)
    ref = []
    for i in range(6):
        e = rows[i]
        W = {n: getattr(ex, f"w_{n}")[e] + getattr(ex, f"lora_{n}_A")[e] @ getattr(ex, f"lora_{n}_B")[e] * ex.scale
             for n in ("gate", "up", "down")}
        h = torch.nn.functional.silu(x[i] @ W["gate"]) * (x[i] @ W["up"])
        ref.append(h @ W["down"])
    assert torch.allclose(y, torch.stack(ref), atol=1e-10)


def test_lora_gradients_only_where_trainable():
    model = tiny()
    apply_lora(model, rank=2, alpha=4.0, targets=("attention",))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert isinstance(model.layers[1].self_attn.q_proj, LoRALinear)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, rank=2, alpha=1.0, targets=("mlp",))


@pytest.mark.parametrize("twin_init", [False, True])
@pytest.mark.parametrize("target", [0.75, 1.5])
def test_budget_controller_holds_target_true_experts(target, twin_init):
    torch.manual_seed(0)
    r = NullExpertRouter(32, MoEConfig(router="null_experts", num_experts=8, num_null_experts=16, top_k=4,
                                       target_true_experts=target))  # default gains
    if twin_init:
        # null twins tie exactly with their true expert, so the response to the bias is a step: the controller
        # may alternate around the target, but must hold it on average
        r.init_null_gate_from_true()
    x = torch.randn(512, 32)
    measured = []
    for _ in range(150):
        m = r(x).true_experts_per_token_T.mean().item()
        measured.append(m)
        r.update_budget(m)
    assert abs(measured[0] - target) > 0.1  # the uncontrolled router is elsewhere
    assert abs(sum(measured[-20:]) / 20 - target) < 0.05
    if not twin_init:
        assert max(measured[-20:]) - min(measured[-20:]) < 0.05  # settled, not oscillating
