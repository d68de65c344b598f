"""`moe-train plan`: every shipped config plans at its real world size, the CLI prints the verdict, bad inputs fail
clearly, and the plan's figures follow from what it reads (null experts and Ada-K scale FLOPs and bytes with the
TRUE experts per token; sharded bytes shrink with the world). Memory against measurement: test_planner_memory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_train.cli import main
from moe_train.config import load_config
from moe_train.planner import Cluster, PlanError, make_plan, resolve_cluster
from moe_train.planner.cli import job_of

CONFIGS = sorted(str(p) for p in Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_every_shipped_config_plans_at_its_world_size(path):
    cfg = load_config(path)
    cluster = resolve_cluster(cfg, None, 8, "h100")
    plan = make_plan(cfg, cluster, job_of(path, "auto"), advise=False)  # every layer kind has its formula
    assert plan["world"] == (cfg.parallel.world_size or cfg.parallel.ep)
    assert plan["memory"]["peak"] > plan["memory"]["params"] > 0
    assert plan["time"]["serial_s"] > 0 and plan["time"]["bound_by"]


def test_unknown_layer_kind_is_named_never_guessed():
    from torch import nn

    from moe_train.planner.activations import Regime, layer_activations

    with pytest.raises(PlanError, match="no activation formula for decoder layer Linear.*planner/activations.py"):
        layer_activations(nn.Linear(2, 2), Regime(c=4, r=4, autocast=False))


def test_cli_16_h100_mixtral_8x22b(capsys):
    assert main(["plan", "--config", "configs/mixtral_8x22b_adamoe.yaml", "--gpu", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world"], plan["nodes"], plan["dp"], plan["ep"]) == (16, 2, 2, 8)
    # 141 B parameters over 16 ranks, the frozen base in bf16 (train/build.py: no fp32 master for a weight that
    # never updates; LoRA + routers train in fp32): 141e9 x 2 B / 16 = 17.6 GB of shards per GPU (was ~35 in fp32)
    assert 16e9 < plan["memory"]["params"] < 19e9
    assert plan["params_trainable"] < 0.01 * plan["params_total"]
    # ep 8 on 8-GPU nodes: every all-to-all stays inside the node; the expert shards' FSDP group (dp 2) crosses it
    assert plan["traffic"]["a2a_inter"] == 0 and plan["traffic"]["a2a_intra"] > 0
    assert plan["traffic"]["fsdp_inter"] > 0
    assert isinstance(plan["fits"], bool)


def test_null_experts_scale_flops_and_bytes_with_true_experts():
    cfg = load_config("configs/tiny_adamoe.yaml", ["parallel.ep=2", "parallel.world_size=2"])
    base = make_plan(cfg, Cluster(2, 2), "train", true_experts=2.0, advise=False)
    half = make_plan(cfg, Cluster(2, 2), "train", true_experts=1.0, advise=False)
    # all-to-all bytes are rows x D x bytes: proportional to true experts per token, exactly
    assert half["traffic"]["a2a_intra"] == pytest.approx(base["traffic"]["a2a_intra"] / 2, rel=1e-12)
    fl, flb = half["flops"], base["flops"]
    assert fl["expert"] == pytest.approx(flb["expert"] / 2, rel=1e-12)
    assert fl["dense"] == flb["dense"]
    # the top-k baseline column is the same model at k = 2 without the null gate: flops_vs_topk < 1 at 1 expert
    assert half["flops"]["flops_vs_topk"] < 1 < base["flops"]["flops_vs_topk"] + 1e-9
    assert half["traffic_topk_baseline"]["a2a_intra"] == base["traffic"]["a2a_intra"]


def test_sharded_bytes_follow_the_world():
    cfg = load_config("configs/tiny_top2.yaml", ["parallel.ep=2"])
    p2 = make_plan(cfg, Cluster(2, 8), "train", advise=False)
    p8 = make_plan(cfg, Cluster(8, 8), "train", advise=False)
    assert p8["memory"]["params"] < p2["memory"]["params"] / 3  # ~1/4, plus FSDP padding of small tensors


def test_adak_plan_counts_only_allocators_as_trainable():
    cfg = load_config("configs/tiny_adak.yaml")
    plan = make_plan(cfg, Cluster(1, 1), "adak", advise=False)
    a = cfg.adak
    assert plan["params_trainable"] == cfg.model.num_layers * cfg.model.hidden_size * (a.k_max - a.k_min + 1)
    assert plan["memory"]["optimizer"] == 2 * 4 * plan["params_trainable"]
    assert plan["tokens"]["k_worst"] == a.k_max


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "x100"], "not in the planner's table"),
    (["--nodes", "3"], "is written for parallel.world_size=16"),
    (["--set", "parallel.world_size=null", "--nodes", "1", "--gpus-per-node", "4"], "not divisible by parallel.ep=8"),
    (["--set", "parallel.world_size=24", "--nodes", "3"], "train.batch_size=64 must be divisible"),
])
def test_bad_inputs_fail_clearly(capsys, argv, message):
    assert main(["plan", "--config", "configs/mixtral_8x22b_adamoe.yaml", *argv]) == 2
    assert message in capsys.readouterr().err


def test_does_not_fit_names_a_change_that_would():
    cfg = load_config("configs/mixtral_8x7b_adamoe.yaml", ["train.lora_rank=0", "train.trainable=[]",
                                                            "train.activation_checkpointing=false"])
    plan = make_plan(cfg, resolve_cluster(cfg, None, 8, "h100"), "train")
    assert not plan["fits"]
    assert any(s.get("fits") for s in plan["suggestions"]), plan["suggestions"]


def test_startup_phases_are_planned_and_the_verdict_takes_the_largest():
    """Loading, the first step and the final save / export are phases of the plan; the verdict's figure is the
    largest GPU figure of them all and of the steady step."""
    cfg = load_config("configs/tiny_adamoe.yaml", ["parallel.ep=2", "parallel.world_size=4", "train.lora_rank=4",
                                                   "train.trainable=[router\\., lora_]", "train.export_hf=true"])
    plan = make_plan(cfg, Cluster(4, 4), "train", advise=False)
    phases = plan["startup"]
    assert set(phases) == {"load", "first step", "export model.pt", "export hf"}
    for p in phases.values():
        assert p["gpu"] > 0 and p["host_per_node"] >= 0 and p["what"]
    figures = {"steady step": plan["memory"]["peak"], **{k: v["gpu"] for k, v in phases.items()}}
    assert plan["peak_gpu"] == max(figures.values()) and figures[plan["peak_gpu_at"]] == plan["peak_gpu"]
    assert plan["peak_host_per_node"] == max(p["host_per_node"] for p in phases.values())
    # the first step has no AdamW moments yet; the export keeps the training state and gathers on top of it
    assert phases["first step"]["gpu"] <= plan["memory"]["peak"]
    assert phases["export model.pt"]["gpu"] > plan["memory"]["params"] + plan["memory"]["optimizer"]
    from moe_train.planner.report import render

    text = render(make_plan(cfg, Cluster(4, 4), "train", advise=False))
    assert all(name in text for name in phases) and "peak (all phases)" in text and "host per node" in text


def test_a_startup_phase_above_the_usable_memory_does_not_fit(monkeypatch):
    """fits is decided on the largest phase: a load phase past the GPU's usable memory fails a job whose steady
    step fits, and the report names that phase."""
    import moe_train.planner.plan as P

    real = P.startup_phases

    def with_a_huge_load(*args, **kwargs):
        phases = real(*args, **kwargs)
        phases["load"]["gpu"] = 79 * 2**30
        return phases

    cfg = load_config("configs/tiny_adamoe.yaml", ["parallel.ep=2", "parallel.world_size=4"])
    assert make_plan(cfg, Cluster(4, 4), "train", advise=False)["fits"]
    monkeypatch.setattr(P, "startup_phases", with_a_huge_load)
    plan = make_plan(cfg, Cluster(4, 4), "train", advise=False)
    assert plan["memory"]["peak"] <= plan["usable_bytes"] < plan["peak_gpu"]
    assert (plan["peak_gpu_at"], plan["fits"], plan["fits_worst_case"]) == ("load", False, False)


def test_frozen_weights_count_two_bytes_in_bf16_without_optimizer_state():
    """Under bf16 precision a frozen weight is stored in bf16 (train/build.py _frozen_to): 2 bytes, no gradient, no
    AdamW moments; trainable ones are fp32 masters (4 bytes) with fp32 gradients and two fp32 moments."""
    from moe_train.planner.build import build_job_model

    cfg = load_config("configs/tiny_adamoe.yaml", ["train.precision=bf16", "train.lora_rank=4",
                                                   "train.trainable=[router\\., lora_]"])
    model = build_job_model(cfg, "train", 1).model
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert frozen and trainable
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    plan = make_plan(cfg, Cluster(1, 1), "train", advise=False)
    m = plan["memory"]
    assert m["params"] == 2 * frozen + 4 * trainable
    assert m["optimizer"] == 2 * 4 * trainable and m["gradients"] == 4 * trainable
    fp32 = make_plan(load_config("configs/tiny_adamoe.yaml", ["train.precision=fp32", "train.lora_rank=4",
                                                              "train.trainable=[router\\., lora_]"]),
                     Cluster(1, 1), "train", advise=False)
    assert fp32["memory"]["params"] == 4 * (frozen + trainable) and fp32["memory"]["optimizer"] == m["optimizer"]
