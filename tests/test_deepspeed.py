"""The DeepSpeed engine (parallel.engine: deepspeed, train/deepspeed_engine.py) against the FSDP2 engine.

One spawn per world size (2 and 4 gloo ranks) trains every job of that size; the reference of each DeepSpeed run is
the same config under FSDP2 in the same spawn (an independent implementation of the reduction, clipping, optimizer
step and checkpoints). In fp32 the loss trajectories must agree within 1e-4 for
  * AdaMoE null experts, ep = 2, ZeRO stage 2, gradient accumulation 2, clipping that binds (2 ranks) and
    ZeRO stage 1 at dp 2 x ep 2 (4 ranks);
  * top-k with LoRA and a frozen base (trainable: LoRA + routers), ep = 1, ZeRO stage 3 (2 ranks);
  * ZeRO stage 3 at ep = 1 with null experts (null_kind zero and constant) and top-p (2 ranks; Ada-K is refused);
  * Ada-K warm start + PPO, ep = 2, ZeRO stage 1 (2 ranks);
and the final model.pt files too. Resume: a run continued from its step-2 DeepSpeed checkpoint repeats the
uninterrupted steps 3-4 bit for bit. bf16 (2 ranks, ZeRO 2): runs, finite, near the fp32 trajectory, exports fp32
masters. Bad combinations fail in config validation or before training with a message naming the key.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'moe_train[deepspeed]')")

from moe_train.config import (  # noqa: E402
    AdaKConfig,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    to_dict,
    validate,
)

import deepspeed_workers as DW  # noqa: E402
import ep_workers as W  # noqa: E402

TOL = 1e-4  # fp32 loss of two engines (different reduction order: DeepSpeed's flat buckets vs FSDP's shards)
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")


def base_config(router: str = "null", ep: int = 2, **train) -> Config:
    moe = (MoEConfig(router="null", num_experts=4, num_null_experts=4, top_k=3, aux_loss_coef=0.01, z_loss_coef=1e-3)
           if router == "null" else MoEConfig(router="topk", num_experts=4, top_k=2, aux_loss_coef=0.01))
    t = dict(steps=4, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=1, log_every=100, grad_clip=0.3,
             tensorboard=False)
    t.update(train)
    return Config(model=ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                                    num_kv_heads=1, max_seq_len=16, moe=moe),
                  train=TrainConfig(**t), data=DataConfig(num_sequences=48, val_sequences=8),
                  parallel=ParallelConfig(ep=ep, rendezvous_timeout_s=60))


def engine(cfg: Config, out: Path, name: str, stage=None, **overrides) -> dict:
    c = copy.deepcopy(cfg)
    if stage is not None:
        c.parallel.engine, c.deepspeed.stage = "deepspeed", stage
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(c, section), field, value)
    c.train.out_dir = str(out / name)
    validate(c)
    return to_dict(c)


def adak_config(out: Path, ep: int) -> Config:
    cfg = base_config("topk", ep=ep, batch_size=4, grad_clip=1.0, init_from=str(out / "topk.pt"))
    cfg.adak = AdaKConfig(k_min=0, k_max=3, warm_start_steps=2, ppo_steps=2, ppo_epochs=2, ppo_minibatches=2,
                          baseline="batch_mean")
    return cfg


def rows(out: Path, name: str, key: str = "lm_loss") -> list[dict]:
    return [r for r in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds2")
    null = base_config("null", ep=2, grad_accum_steps=2, checkpoint_every=2)
    topk = base_config("topk", ep=1, steps=3, lora_rank=2, trainable=["lora_", "router\\."])  # frozen base
    adak = adak_config(out, ep=2)
    jobs = [engine(null, out, "null_fsdp"), engine(null, out, "null_ds2", stage=2),
            engine(null, out, "null_ds2_resumed", stage=2,
                   train__resume_from=str(out / "null_ds2" / "checkpoints" / "step_00000002")),
            engine(topk, out, "topk_fsdp"), engine(topk, out, "topk_ds3", stage=3),
            dict(engine(adak, out, "adak_fsdp"), job="adak"), dict(engine(adak, out, "adak_ds1", stage=1), job="adak"),
            engine(null, out, "null_ds2_bf16", stage=2, train__precision="bf16", train__checkpoint_every=0)]
    start = time.perf_counter()
    res = W.spawn(DW.train_jobs, 2, out, cfg_dicts=jobs, topk_model=str(out / "topk.pt"))
    return {"out": out, "res": res, "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds4")
    null = base_config("null", ep=2, steps=3)
    jobs = [engine(null, out, "null_fsdp"), engine(null, out, "null_ds1", stage=1)]
    res = W.spawn(DW.train_jobs, 4, out, cfg_dicts=jobs)
    return {"out": out, "res": res}


@pytest.fixture(scope="module")
def world2_zero3(tmp_path_factory):
    """ZeRO stage 3 at ep 1 for the routers that read parameters outside their module's forward (null and Ada-K
    concatenate gate + null_gate into one GEMM; the combine reads null_values): each against FSDP, top-p too."""
    out = tmp_path_factory.mktemp("ds3")
    jobs = []
    for kind in ("zero", "constant"):
        cfg = base_config("null", ep=1, steps=2)
        cfg.model.moe.null_kind = kind
        jobs += [engine(cfg, out, f"null_{kind}_fsdp"), engine(cfg, out, f"null_{kind}_ds3", stage=3)]
    top_p = base_config("topk", ep=1, steps=2)
    top_p.model.moe = MoEConfig(router="top_p", num_experts=4, top_p=0.5, routed_scaling_factor=1.5)
    jobs += [engine(top_p, out, "top_p_fsdp"), engine(top_p, out, "top_p_ds3", stage=3),
             dict(engine(adak_config(out, ep=1), out, "adak_ds3", stage=3), job="adak")]
    res = W.spawn(DW.train_jobs, 2, out, cfg_dicts=jobs, topk_model=str(out / "topk.pt"))
    return {"out": out, "res": res}


def assert_same_trajectory(out: Path, a: str, b: str, n: int, keys=KEYS, tol: float = TOL) -> None:
    ra, rb = rows(out, a), rows(out, b)
    assert len(ra) == len(rb) == n, (len(ra), len(rb))
    for x, y in zip(ra, rb):
        for k in keys:
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])), (x["step"], k, x[k], y[k])


def assert_same_model(out: Path, a: str, b: str, tol: float = TOL) -> None:
    sa = torch.load(out / a / "final" / "model.pt", weights_only=True)["model"]
    sb = torch.load(out / b / "final" / "model.pt", weights_only=True)["model"]
    assert list(sa) == list(sb)
    assert all(sa[k].dtype == sb[k].dtype == torch.float32 for k in sb if sb[k].is_floating_point())
    worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sb)
    assert worst <= tol, worst


def test_null_experts_ep2_stage2_equals_fsdp(world2):
    assert all(e is None for r in world2["res"] for e in r["errors"]), world2["res"][0]["errors"]
    assert_same_trajectory(world2["out"], "null_ds2", "null_fsdp", 4)
    assert_same_model(world2["out"], "null_ds2", "null_fsdp")
    assert any(r["grad_norm"] > 0.3 for r in rows(world2["out"], "null_fsdp"))  # the clipping did bind


def test_resume_from_deepspeed_checkpoint_is_exact(world2):
    out = world2["out"]
    full, resumed = rows(out, "null_ds2"), rows(out, "null_ds2_resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:]):
        assert all(a[k] == b[k] for k in KEYS), (a, b)
    ckpt = out / "null_ds2" / "checkpoints" / "step_00000002"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "deepspeed").is_dir()


def test_topk_lora_ep1_stage3_equals_fsdp(world2):
    assert_same_trajectory(world2["out"], "topk_ds3", "topk_fsdp", 3)
    assert_same_model(world2["out"], "topk_ds3", "topk_fsdp")


@pytest.mark.parametrize("name", ["null_zero", "null_constant", "top_p"])
def test_zero3_ep1_equals_fsdp(world2_zero3, name):
    """Null experts crashed ZeRO-3's first backward (gate / null_gate partitioned to size 0 for their gradient):
    the routers' parameters are now gathered with their MoE layer (deepspeed_engine.register_router_parameters)."""
    out = world2_zero3["out"]
    assert world2_zero3["res"][0]["errors"][:6] == [None] * 6, world2_zero3["res"][0]["errors"]
    assert_same_trajectory(out, f"{name}_ds3", f"{name}_fsdp", 2)
    assert_same_model(out, f"{name}_ds3", f"{name}_fsdp")


def test_zero3_adak_is_refused_before_training(world2_zero3):
    errors = [r["errors"][6] for r in world2_zero3["res"]]
    assert errors[0] == errors[1] and "deepspeed.stage=3 cannot train Ada-K" in errors[0], errors
    metrics = world2_zero3["out"] / "adak_ds3" / "metrics.jsonl"
    assert not metrics.exists() or rows(world2_zero3["out"], "adak_ds3", "stage") == []  # no step was trained


def test_adak_warm_start_and_ppo_equal_fsdp(world2):
    out = world2["out"]
    for stage, keys in (("warm_start", ("ce_loss", "label_acc")),
                        ("ppo", ("reward", "loglik", "mean_k", "policy_loss", "approx_kl", "grad_norm"))):
        a = [r for r in rows(out, "adak_ds1", "stage") if r["stage"] == stage]
        b = [r for r in rows(out, "adak_fsdp", "stage") if r["stage"] == stage]
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            for k in keys:
                assert abs(x[k] - y[k]) <= TOL * max(1.0, abs(y[k])), (stage, x["step"], k, x[k], y[k])
    assert_same_model(out, "adak_ds1", "adak_fsdp")


def test_four_ranks_dp2_ep2_stage1(world4):
    out = world4["out"]
    assert all(e is None for r in world4["res"] for e in r["errors"])
    assert_same_trajectory(out, "null_ds1", "null_fsdp", 3)
    assert_same_model(out, "null_ds1", "null_fsdp")


def test_bf16_runs_near_fp32_and_exports_fp32_masters(world2):
    out = world2["out"]
    # bf16 compute with fp32 masters (DeepSpeed's bf16 + ZeRO 2): finite, near the fp32 run (bf16 rounding only)
    assert_same_trajectory(out, "null_ds2_bf16", "null_fsdp", 4, keys=("loss", "lm_loss"), tol=3e-2)
    # float32 tensors: the masters, not bf16. AdamW's normalised step moves an element by up to lr per step whatever
    # its gradient's size, so a near-zero gradient whose sign bf16 flips can put the two runs 2 x lr apart per step:
    # the bound is 2 x lr x steps (1e-2, 4 steps; measured 0.056 on the expert weights, 0.02 elsewhere)
    assert_same_model(out, "null_ds2_bf16", "null_fsdp", tol=2 * 1e-2 * 4)


@pytest.mark.parametrize("change, match", [
    (dict(deepspeed=DeepSpeedConfig(stage=3)), r"parallel.ep=2 .*ZeRO stage 3"),
    (dict(deepspeed=DeepSpeedConfig(stage=4)), r"deepspeed.stage=4 .*one of \(1, 2, 3\)"),
    (dict(engine="ds"), r"parallel.engine='ds' .*one of \('fsdp', 'deepspeed'\)"),
])
def test_bad_combinations_fail_in_validation(change, match):
    cfg = base_config("null", ep=2)
    cfg.parallel.engine = "deepspeed"
    if "engine" in change:
        cfg.parallel.engine = change["engine"]
    if "deepspeed" in change:
        cfg.deepspeed = change["deepspeed"]
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_deepspeed_json_conflicts_are_refused(tmp_path):
    cfg = base_config("null", ep=1)
    cfg.parallel.engine = "deepspeed"
    path = tmp_path / "ds.json"
    cfg.deepspeed = DeepSpeedConfig(config=str(path))
    path.write_text(json.dumps({"train_batch_size": 64, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"sets \['gradient_clipping', 'train_batch_size'\].*train.grad_clip"):
        validate(cfg)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    validate(cfg)  # DeepSpeed's own settings pass through
    cfg.deepspeed.stage = 1
    with pytest.raises(ConfigError, match=r"deepspeed.stage=1 conflicts with zero_optimization.stage=2"):
        validate(cfg)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        validate(cfg)


def test_single_process_is_refused_before_training():
    from moe_train.parallel.distributed import ParallelContext
    from moe_train.train.engine_registry import engine_class

    cfg = base_config("topk", ep=1)
    cfg.parallel.engine = "deepspeed"
    engine = engine_class(cfg.parallel.engine)  # the Trainer prepares its model with the class, before any engine
    with pytest.raises(ValueError, match=r"parallel.engine: deepspeed needs a distributed launch"):
        engine.prepare_model(torch.nn.Linear(1, 1), ParallelContext(), built=False)
