"""The router registry (routing/registry.py, routing/base.py): names and the old name "null", each class's facts
against what its module really does, a router added in one class, and old configs / checkpoints / exports that
still say "null"."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moe_train.config import Config, ConfigError, ModelConfig, MoEConfig, apply_overrides, from_dict, load_config
from moe_train.io.hf import from_hf, to_hf
from moe_train.model import build_model
from moe_train.routing import NullExpertRouter, build_router, router_class, router_names
from moe_train.routing.base import ALIASES, ROUTERS, register
from moe_train.routing.topk import TopKRouter
from moe_train.train.fingerprint import ResumeConfigMismatch, check_resume, config_record

CTX = SimpleNamespace(world_size=1, ep_size=1)
D = 16
MOES = {
    "topk": dict(num_experts=6, top_k=2),
    "null_experts": dict(num_experts=4, num_null_experts=4, top_k=3, null_kind="identity"),
    "adak": dict(num_experts=6, top_k=2, k_min=0, k_max=4),
    "top_p": dict(num_experts=6, top_k=2, top_p=0.5, k_max=5),
}


def test_every_registered_router_is_covered_here_and_the_old_name_resolves():
    assert set(router_names()) == set(MOES)
    assert router_class("null") is router_class("null_experts") is NullExpertRouter
    assert ALIASES == {"null": "null_experts"}
    with pytest.raises(ConfigError, match="model.moe.router='nope'"):
        router_class("nope")


@pytest.mark.parametrize("name", list(MOES))
def test_declared_slots_and_experts_match_the_router_forward(name):
    """What the class declares (the plan's slots, the pickable experts) against the plan its forward returns."""
    cfg = MoEConfig(router=name, **MOES[name])
    torch.manual_seed(0)
    router = build_router(D, cfg)
    assert type(router) is router_class(name) and router.name == name
    plan = router(torch.randn(9, D))
    assert plan.expert_idx_TK.shape == (9, cfg.max_slots)
    assert plan.probs_TN.shape[-1] <= cfg.pickable_experts
    # the Router protocol's hooks exist on every router, no-ops where the router has no such state
    router.update_bias(plan.counts_E)
    router.update_budget(1.0)
    assert (router.null_values is None) == (cfg.null_kind != "constant")


def test_a_router_is_one_registered_class():
    """A router defined here (a top-k that always routes to the k lowest-index experts), registered: the config
    accepts it, the model builds it and trains through it, the planner-facing facts default sensibly."""

    @register
    class FirstKRouter(TopKRouter):
        name = "first_k_test"

        def forward(self, x_TD):
            plan = super().forward(x_TD)
            idx_TK = torch.arange(self.top_k, device=x_TD.device).expand(x_TD.shape[0], -1)
            plan.expert_idx_TK = idx_TK
            return plan

    try:
        cfg = ModelConfig(vocab_size=32, hidden_size=D, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                          moe=MoEConfig(router="first_k_test", num_experts=4, top_k=2))
        model = build_model(cfg)
        out = model(torch.randint(0, 32, (2, 5)))
        assert torch.isfinite(out).all()
        assert cfg.moe.max_slots == 2 and router_class("first_k_test").kernel_excluded(cfg.moe) == ""
    finally:
        del ROUTERS["first_k_test"]
    with pytest.raises(ConfigError, match="model.moe.router='first_k_test'"):
        apply_overrides(Config(), ["model.moe.router=first_k_test"])


def test_config_files_with_the_old_name_load_as_null_experts(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text('model:\n  moe:\n    router: "null"\n    num_experts: 4\n    num_null_experts: 4\n    top_k: 3\n')
    cfg = load_config(path)
    assert cfg.model.moe.router == "null_experts"
    assert from_dict(MoEConfig, {"router": "null", "num_null_experts": 2}).router == "null_experts"
    # unquoted null is YAML's nothing: the message names the router's name
    path.write_text("model:\n  moe:\n    router: null\n")
    with pytest.raises(ConfigError, match="router: null_experts"):
        load_config(path)


@pytest.mark.parametrize("override,words", [
    ("model.moe.score_func=tanh", ["model.moe.score_func='tanh'", "softmax", "sigmoid"]),
    ("model.moe.routing_backend=cuda", ["model.moe.routing_backend='cuda'", "triton"]),
    ("deepspeed.stage=true", ["deepspeed.stage=True", "(1, 2, 3)"]),  # YAML true is not stage 1
    ("train.lora_targets=[attention, mlp]", ["train.lora_targets[1]='mlp'", "experts"]),
    ("model.moe.router=magic", ["model.moe.router='magic'", "null_experts"]),
])
def test_choice_keys_are_checked_where_the_yaml_is_read(override, words):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "'null'" not in str(err.value)  # the old name loads but is not offered


def test_a_checkpoint_that_says_null_resumes_as_null_experts(tmp_path):
    cfg = apply_overrides(Config(), ["model.moe.router=null_experts", "model.moe.num_null_experts=8",
                                     "model.moe.top_k=4"])
    record = config_record(cfg, CTX)
    record["model"]["moe"]["router"] = "null"  # what a checkpoint written before the rename holds
    torch.save({"config": record}, tmp_path / "trainer.pt")
    assert check_resume(tmp_path, cfg, CTX) == {}
    other = apply_overrides(cfg, ["model.moe.router=adak", "model.moe.k_max=6"])
    with pytest.raises(ResumeConfigMismatch, match=r"model\.moe\.router: 'null_experts' in the checkpoint, 'adak'"):
        check_resume(tmp_path, other, CTX)


def test_an_export_that_says_null_loads_here_and_in_its_own_modeling_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, baseline_top_k=2,
                    null_kind="identity", aux_loss_coef=1e-2)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, moe=moe)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    to_hf(model, tmp_path / "x")
    config_json = tmp_path / "x" / "config.json"
    hf = json.loads(config_json.read_text())
    assert hf["moe_train"]["router"] == "null_experts"
    hf["moe_train"]["router"] = "null"  # an export written before the rename
    config_json.write_text(json.dumps(hf))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        back = from_hf(tmp_path / "x")
        assert back.config.moe.router == "null_experts"
        assert torch.equal(back.eval()(ids), want)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True).eval()
        assert (ref(ids).logits - want).abs().max().item() <= 1e-4
