"""train.compile (moe_train/parallel/compile.py): decoder blocks compiled by torch.compile (inductor) train along
the eager run's trajectory, in one process and on two gloo ranks (expert parallel, FSDP2); refused combinations.

The reference is the same job run eagerly: inductor's generated kernels against aten's eager ones. fp32 on the CPU:
the losses agree to rounding (a fused kernel sums in another order), not bit for bit.
"""

import json

import pytest
import torch

from moe_train.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    to_dict,
    validate,
)

import ep_workers as W

STEPS = 20
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")


def _cfg(out, compile: bool, ep: int = 1, **train) -> Config:
    moe = MoEConfig(router="null", num_experts=4, num_null_experts=4, top_k=3, aux_loss_coef=0.01, z_loss_coef=1e-3,
                    expert_bias_rate=1e-3)
    return Config(model=ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                                    num_kv_heads=1, max_seq_len=16, moe=moe),
                  train=TrainConfig(**{**dict(steps=STEPS, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1,
                                              log_every=100, grad_clip=0.5, out_dir=str(out), tensorboard=False,
                                              compile=compile), **train}),
                  # no validation split: an eval pass would compile every block once more (no-grad graphs)
                  data=DataConfig(num_sequences=32, val_sequences=0),
                  parallel=ParallelConfig(ep=ep, global_aux_loss=ep > 1, rendezvous_timeout_s=60))


def _rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lm_loss" in r]


def _assert_same_trajectory(compiled: list[dict], eager: list[dict]) -> None:
    assert len(compiled) == len(eager) == STEPS
    for step, (c, e) in enumerate(zip(compiled, eager), 1):
        for key in KEYS:
            assert c[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), (step, key, c[key], e[key])


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_pair(cfg_dicts: list[dict]) -> dict:
    """Rank side: the compiled job, then the eager one, on one process group; the graphs Dynamo made."""
    from moe_train.config import from_dict
    from moe_train.parallel.distributed import init_distributed
    from moe_train.train.trainer import train

    cfgs = [from_dict(Config, c) for c in cfg_dicts]
    ctx = init_distributed(cfgs[0].parallel, cfgs[0].model.moe.num_experts)
    graphs = []
    for cfg in cfgs:
        validate(cfg)
        train(cfg, ctx)
        graphs.append(_compiled_frames())
    return {"graphs": graphs}


def test_compiled_blocks_follow_eager_trajectory_single_process(tmp_path):
    """ep 1, with activation checkpointing (recomputing a compiled block) and 2 micro-batches per step. In a fresh
    process, as a job runs: Dynamo's caches and settings are process-wide, and the suite's earlier tests share this
    one."""
    from moe_train.io.model_file import load_model

    cfgs = [to_dict(_cfg(tmp_path / name, compile, activation_checkpointing=True, grad_accum_steps=2))
            for name, compile in (("compiled", True), ("eager", False))]
    (res,) = W.spawn(compile_pair, 1, tmp_path, cfg_dicts=cfgs)
    assert res["graphs"][0] > 0  # the blocks did run compiled
    _assert_same_trajectory(_rows(tmp_path / "compiled"), _rows(tmp_path / "eager"))
    # compiled in place: the checkpoint keeps the plain parameter names (no "_orig_mod.")
    sd_c = load_model(tmp_path / "compiled" / "final" / "model.pt").state_dict()
    sd_e = load_model(tmp_path / "eager" / "final" / "model.pt").state_dict()
    assert list(sd_c) == list(sd_e)


def test_compiled_blocks_in_bf16_follow_eager(tmp_path):
    """bf16 compute (train.precision: bf16): the expert GEMM (torch._grouped_mm) is inside the compiled graphs, and the
    dispatcher's phases hand their state on across the graph breaks around it (a state mutated in one phase was
    lost: the combine got no expert output). bf16 tolerance, 4 steps, in a process of its own."""
    cfgs = [to_dict(_cfg(tmp_path / name, compile, precision="bf16", steps=4))
            for name, compile in (("compiled", True), ("eager", False))]
    (res,) = W.spawn(compile_pair, 1, tmp_path, cfg_dicts=cfgs)
    assert res["graphs"][0] > 0
    compiled, eager = _rows(tmp_path / "compiled"), _rows(tmp_path / "eager")
    assert len(compiled) == len(eager) == 4
    for c, e in zip(compiled, eager):
        assert c["lm_loss"] == pytest.approx(e["lm_loss"], rel=2e-2), (c["step"], c["lm_loss"], e["lm_loss"])


def test_compiled_blocks_follow_eager_trajectory_on_two_ranks(tmp_path):
    """ep 2 on 2 gloo ranks: expert shards, all-to-all dispatch, FSDP2 units around compiled blocks."""
    cfgs = [to_dict(_cfg(tmp_path / name, compile, ep=2)) for name, compile in (("compiled", True), ("eager", False))]
    res = W.spawn(compile_pair, 2, tmp_path, cfg_dicts=cfgs)
    for r in res:
        assert r["graphs"][0] > 0  # every rank compiled its blocks
    _assert_same_trajectory(_rows(tmp_path / "compiled"), _rows(tmp_path / "eager"))


def test_compile_with_zero3_is_refused():
    cfg = _cfg("unused", True)
    cfg.parallel.engine, cfg.deepspeed.stage = "deepspeed", 3
    with pytest.raises(ConfigError, match="train.compile.*ZeRO stage 3"):
        validate(cfg)
    cfg.deepspeed.stage = 2
    validate(cfg)  # stage 2 trains compiled
    cfg.deepspeed.stage, cfg.train.compile = 3, False
    validate(cfg)  # the stage alone is fine: the refusal is the combination


def test_compile_is_off_by_default_and_leaves_blocks_eager():
    from moe_train.model import build_model
    from moe_train.parallel.compile import apply_compile

    assert TrainConfig().compile is False
    model = build_model(_cfg("unused", False).model)
    apply_compile(model, TrainConfig(), torch.device("cpu"))
    assert all(block._compiled_call_impl is None for block in model.layers)
    apply_compile(model, TrainConfig(compile=True), torch.device("cpu"))
    assert all(block._compiled_call_impl is not None for block in model.layers)
