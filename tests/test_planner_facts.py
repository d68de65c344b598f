"""The planner's parameter facts against each shipped family's published size (total within 1 %, active per token
within a few %), and the bottleneck advice: the step's largest roofline term, named with remedies that say whether
moe_train implements them."""

from __future__ import annotations

import pytest

from moe_train.config import load_config
from moe_train.planner import Cluster, make_plan
from moe_train.planner.advice import bound_advice
from moe_train.planner.build import build_job_model
from moe_train.planner.cli import job_of
from moe_train.planner.plan import parameter_facts
from moe_train.planner.report import render
from moe_train.planner.workload import true_experts

# (config, published total, published active per token, whether the publisher counts the embedding table as active)
# Mixtral (mistral.ai), Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B (Qwen model cards), DeepSeek-V2-Lite (its paper / card:
# 2.4 B activated; 2.66 B with the 0.21 B embedding table, 2.45 B without: the embedding lookup is not counted).
PUBLISHED = [
    ("configs/mixtral_8x7b_adamoe.yaml", 46.7e9, 12.9e9, True),
    ("configs/mixtral_8x22b_adamoe.yaml", 141e9, 39e9, True),
    ("configs/qwen3_moe_adamoe.yaml", 30.5e9, 3.3e9, True),
    ("configs/adak_deepseek_v2_lite.yaml", 15.7e9, 2.4e9, False),
    ("configs/adak_qwen1.5_moe.yaml", 14.3e9, 2.7e9, True),
]


@pytest.mark.parametrize("path,total,active,with_embedding", PUBLISHED, ids=lambda x: str(x).split("/")[-1])
def test_family_sizes_match_published(path, total, active, with_embedding):
    cfg = load_config(path)
    job = job_of(path, "auto")
    _, _, k_base = true_experts(cfg, None, job)
    model = build_job_model(cfg, job, 1).model  # on meta, as make_plan builds it
    facts = parameter_facts(model, k_base, k_base)  # make_plan's own function
    assert facts["params_base"] == pytest.approx(total, rel=0.01)
    key = "params_active_per_token_topk_baseline" + ("" if with_embedding else "_no_embedding")
    assert facts[key] == pytest.approx(active, rel=0.03)
    # the job's additions (LoRA adapters, null gates, allocators) are not the family's parameters
    assert facts["params_base"] <= sum(p.numel() for p in model.parameters())


def test_active_parameters_follow_true_experts():
    cfg = load_config("configs/tiny_adamoe.yaml")
    model = build_job_model(cfg, "train", 1).model
    one, two = parameter_facts(model, 1.0, 2.0)["params_active_per_token"], parameter_facts(model, 2.0, 2.0)[
        "params_active_per_token"]
    E, D, F, L = 8, cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_layers
    assert two - one == pytest.approx(3 * D * F * L)  # one more expert (gate, up, down) in every MoE layer
    every = parameter_facts(model, E, E)
    assert every["params_active_per_token"] == every["params_base"]  # all experts active: the whole base model


def test_plan_names_the_bound_and_its_remedies():
    cfg = load_config("configs/tiny_adamoe.yaml", ["parallel.ep=2", "parallel.world_size=4"])
    plan = make_plan(cfg, Cluster(4, 2), "train", advise=False)  # 2 nodes of 2: ep 2 inside a node
    b = plan["bottleneck"]
    assert b["term"] == plan["time"]["bound_by"] == max(plan["time"]["terms"], key=plan["time"]["terms"].get)
    assert b["remedies"] and all(isinstance(r["implemented"], bool) for r in b["remedies"])
    assert 0 < b["share_of_serial"]
    text = render(plan)
    assert f"step bounded by: {b['what']}" in text and "active per token:" in text


@pytest.mark.parametrize("term", ["compute", "hbm", "a2a_nvlink", "a2a_ib", "fsdp_nvlink", "fsdp_ib"])
def test_every_term_has_remedies_marked(term):
    cfg = load_config("configs/mixtral_8x22b_adamoe.yaml")
    terms = {k: (2.0 if k == term else 1.0) for k in ("compute", "hbm", "a2a_nvlink", "a2a_ib", "fsdp_nvlink",
                                                       "fsdp_ib")}
    b = bound_advice(terms, cfg, Cluster(16, 8), frozen_bf16=True)
    assert b["term"] == term and b["remedies"]
    text = {r["remedy"]: r["implemented"] for r in b["remedies"]}
    if term.startswith("fsdp"):
        # the two frozen-expert remedies: bf16 storage exists (and this plan already has it), replication does not
        assert any(r.startswith("frozen weights stored in bf16") and ok and "already" in r for r, ok in text.items())
        assert any(r.startswith("keep frozen experts in bf16, unsharded over dp") and not ok for r, ok in text.items())
    if term == "a2a_ib":
        assert any("parallel.ep <= 8" in r and ok for r, ok in text.items())
