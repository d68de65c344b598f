"""Every shipped config runs as a miniature at its real world size and mesh (moe_train/miniature.py).

The cluster configs (8x22B: 16 ranks, dp 2 x ep 8; 8x7B: 8 ranks, ep 8; Qwen1.5-MoE: 8 ranks, dp 2 x ep 4) run on
that many gloo processes with tiny dimensions and every feature they configure (LoRA on attention and experts,
trainable patterns, bf16, activation checkpointing, gradient accumulation, AdaMoE conversion on load from an HF
folder, checkpoint cadence, HF export, Ada-K warm start and PPO):
  * training configs: a few steps, a mid-run checkpoint, a resume from it that continues the same trajectory, and an
    HF export that transformers loads with the final model's logits;
  * Ada-K configs: warm start then PPO; the allocators after each stage equal a single process that trains on the
    same global batch.
One spawn per world size runs all of its jobs (importing torch in 16 processes costs more than the jobs).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path

import pytest
import torch

from moe_train.config import Config, load_config, to_dict
from moe_train.miniature import FFN, HIDDEN, LAYERS, SEQ_LEN, VOCAB, miniature_config, world_size_of

import miniature_workers as W

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "configs" / "*.yaml")))
WORLDS = {"configs/mixtral_8x22b_adamoe.yaml": 16, "configs/adak_mixtral_8x22b.yaml": 16,
          "configs/mixtral_8x7b_adamoe.yaml": 8, "configs/adak_mixtral_8x7b.yaml": 8,
          "configs/adak_qwen1.5_moe.yaml": 8, "configs/qwen3_moe_adamoe.yaml": 8,
          "configs/adak_deepseek_v2_lite.yaml": 8}
ADAK = {c for c in WORLDS if "adak" in c}
SINGLE_PROCESS = {"configs/tiny_top2.yaml", "configs/tiny_adamoe.yaml", "configs/tiny_adamoe_budget.yaml",
                  "configs/tiny_adak.yaml", "configs/tiny_longcat.yaml", "configs/tiny_hf_finetune.yaml"}
# The allocators are fp32 masters (the frozen base may be bf16): the ranks sum the same terms in another order.
ADAK_TOL = 1e-5


def _load(config: str) -> Config:
    return load_config(REPO / config)


def _mini(config: str, out: Path, *extra: str) -> Config:
    return miniature_config(_load(config), [f"train.out_dir={out}", *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# the miniature keeps the layout and features, shrinks the sizes (no processes)


def test_every_shipped_config_is_run_here():
    """A new config must join WORLDS or SINGLE_PROCESS, so that a miniature of it runs below."""
    assert set(CONFIGS) == set(WORLDS) | SINGLE_PROCESS


def test_cluster_configs_declare_the_world_they_are_written_for():
    assert {c: world_size_of(_load(c)) for c in CONFIGS if world_size_of(_load(c)) > 1} == WORLDS


@pytest.mark.parametrize("config", CONFIGS)
def test_miniature_keeps_layout_and_features_and_shrinks_sizes(config, tmp_path):
    real = _load(config)
    mini = miniature_config(real, [f"train.out_dir={tmp_path / 'run'}"], write_base=False)
    assert world_size_of(mini) == world_size_of(real) and mini.parallel.ep == real.parallel.ep
    m, r = mini.model.moe, real.model.moe
    for key in ("router", "num_experts", "num_null_experts", "top_k", "norm_topk_prob", "capacity_factor",
                "target_true_experts", "aux_loss_coef"):
        assert getattr(m, key) == getattr(r, key), key
    for key in ("trainable", "lora_rank", "lora_targets", "precision", "activation_checkpointing",
                "grad_accum_steps", "batch_size", "export_hf", "seed"):
        assert getattr(mini.train, key) == getattr(real.train, key), key
    assert bool(mini.train.checkpoint_every) == bool(real.train.checkpoint_every)
    assert mini.train.checkpoint_every < mini.train.steps or not real.train.checkpoint_every  # one mid-run save
    assert (mini.adak.warm_start_steps > 0) == (real.adak.warm_start_steps > 0)
    assert (mini.adak.ppo_steps > 0) == (real.adak.ppo_steps > 0)
    assert (mini.model.hidden_size, mini.model.intermediate_size, mini.model.num_layers, mini.model.vocab_size,
            mini.train.seq_len) == (HIDDEN, FFN, LAYERS, VOCAB, SEQ_LEN)
    assert mini.model.shared_expert_intermediate_size == (FFN if real.model.shared_expert_intermediate_size else 0)
    assert mini.data.kind == "synthetic"
    if real.train.init_from:  # replaced by a random model in the same format
        assert mini.train.init_from.endswith("model.pt" if real.train.init_from.endswith(".pt") else "hf")
        assert not mini.train.init_from.startswith(real.train.init_from)


def test_an_explicit_override_wins_over_the_miniature(tmp_path):
    mini = _mini("configs/mixtral_8x7b_adamoe.yaml", tmp_path / "run", "train.steps=5", "train.seq_len=8")
    assert (mini.train.steps, mini.train.seq_len, mini.train.out_dir) == (5, 8, str(tmp_path / "run"))


def test_the_random_base_is_an_hf_folder_of_the_real_family(tmp_path):
    from moe_train.io.hf import from_hf

    mini = _mini("configs/adak_qwen1.5_moe.yaml", tmp_path / "run")
    base = from_hf(mini.train.init_from)
    real = _load("configs/adak_qwen1.5_moe.yaml").model
    assert base.config.family == "qwen2_moe" and base.config.moe.num_experts == 60
    assert base.config.moe.top_k == real.moe.top_k and base.config.moe.norm_topk_prob is False
    assert base.config.attention_bias and base.config.shared_expert_intermediate_size == FFN


def test_a_launch_at_another_world_size_fails_before_any_work():
    from moe_train.parallel.distributed import init_distributed

    cfg = _load("configs/mixtral_8x7b_adamoe.yaml")
    env = {"WORLD_SIZE": "16", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match=r"written for parallel.world_size=8 .*--miniature"):
        init_distributed(cfg.parallel, cfg.model.moe.num_experts, env=env)


# ----------------------------------------------------------------------------------------------------------
# the miniatures run at their real world size


@pytest.mark.parametrize("config", sorted(SINGLE_PROCESS))
def test_single_process_configs_run_as_miniatures_through_the_cli(config, tmp_path):
    from moe_train.cli import main

    command = "adak" if "adak" in config else "train"
    out = tmp_path / "run"
    assert main([command, "--config", str(REPO / config), "--miniature", "--set", f"train.out_dir={out}"]) == 0
    assert (out / "final" / "model.pt").is_file()
    starts_from_a_model = command == "adak" or _load(config).train.init_from is not None  # tiny_adak, tiny_hf_*
    assert (tmp_path / "run-miniature" / "base").is_dir() == starts_from_a_model


def test_the_cli_spawns_the_ranks_of_a_miniature_itself(tmp_path):
    """Outside a launcher, --miniature starts parallel.world_size local gloo ranks (here 2, dp 1 x ep 2)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_train.cli", "train", "--config", str(REPO / "configs/tiny_adamoe.yaml"),
           "--miniature", "--set", "parallel.ep=2", "--set", "parallel.world_size=2", "--set", f"train.out_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "spawning 2 gloo ranks (dp 1 x ep 2)" in result.stderr
    manifest = json.loads((out / "checkpoints" / "step_00000003" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["ep_size"]) == (2, 2)


def _jobs(configs: list[str], root: Path) -> list[dict]:
    jobs = []
    for config in configs:
        out = root / Path(config).stem
        mini = _mini(config, out / "run")
        if config in ADAK:
            jobs.append({"command": "adak", "cfg": to_dict(mini)})
            continue
        jobs.append({"command": "train", "cfg": to_dict(mini)})
        first = mini.train.checkpoint_every
        resumed = dataclasses.replace(mini, train=dataclasses.replace(
            mini.train, out_dir=str(out / "resumed"), export_hf=False,
            resume_from=str(out / "run" / "checkpoints" / f"step_{first:08d}")))
        jobs.append({"command": "train", "cfg": to_dict(resumed)})
    return jobs


@pytest.fixture(scope="module")
def world16(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini16")
    W.run_jobs(16, _jobs([c for c, w in WORLDS.items() if w == 16], root))
    return root


@pytest.fixture(scope="module")
def world8(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini8")
    W.run_jobs(8, _jobs([c for c, w in WORLDS.items() if w == 8], root))
    return root


def _root(request, config):
    return request.getfixturevalue(f"world{WORLDS[config]}") / Path(config).stem


@pytest.mark.parametrize("config", sorted(c for c in WORLDS if c not in ADAK))
def test_training_miniature_checkpoints_resumes_and_exports(request, config):
    root = _root(request, config)
    mini = _mini(config, root / "run")
    run, resumed = _metrics(root / "run"), _metrics(root / "resumed")
    steps = [r for r in run if "val_loss" not in r]
    assert [r["step"] for r in steps] == list(range(1, mini.train.steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r.get("skipped") for r in steps)
    manifest = json.loads((root / "run" / "checkpoints" / f"step_{mini.train.checkpoint_every:08d}" /
                           "manifest.json").read_text())
    assert (manifest["world_size"], manifest["ep_size"]) == (WORLDS[config], mini.parallel.ep)
    # the resume continues the uninterrupted trajectory (same world, same kernels: equal)
    again = {r["step"]: r for r in resumed if "val_loss" not in r}
    assert sorted(again) == list(range(mini.train.checkpoint_every + 1, mini.train.steps + 1))
    for r in steps:
        if r["step"] in again:
            for key in ("loss", "lm_loss", "aux_loss", "true_experts_per_token"):
                assert again[r["step"]][key] == pytest.approx(r[key], rel=1e-6, abs=1e-7), (r["step"], key)
    if mini.train.export_hf:
        _check_hf_export(root / "run")


def _check_hf_export(run: Path) -> None:
    """The export loads in transformers and reproduces the final model's logits (the LoRA deltas merged)."""
    from transformers import AutoModelForCausalLM

    from moe_train.io.model_file import load_model

    ours = load_model(run / "final" / "model.pt").float().eval()
    # routers transformers lacks run from the export's own modeling code (io/hf_remote)
    theirs = AutoModelForCausalLM.from_pretrained(run / "hf", torch_dtype=torch.float32, trust_remote_code=True).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        assert diff < 1e-4, diff
        if ours.config.moe.router != "topk":  # and moe_train reads the extras back
            from moe_train.io.hf import from_hf

            back = from_hf(run / "hf").eval()
            diff = (ours(ids) - back(ids)).abs().max().item()
            assert diff < 1e-5, diff


def _allocators(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v.float() for k, v in state.items() if "allocator" in k}


@pytest.mark.parametrize("config", sorted(ADAK))
def test_adak_miniature_allocators_equal_a_single_process(request, config, tmp_path):
    from moe_train.train.adak import train_adak

    root = _root(request, config)
    mini = _mini(config, root / "run")
    single = miniature_config(_load(config), [f"train.out_dir={tmp_path / 'single'}", "parallel.ep=1",
                                              "parallel.world_size=null"])
    single.train.init_from = mini.train.init_from  # the same random base
    torch.set_num_threads(1)
    train_adak(single)
    for stage in ("warm_start", "final"):
        ours, ref = _allocators(root / "run" / stage / "model.pt"), _allocators(tmp_path / "single" / stage /
                                                                                 "model.pt")
        assert ours.keys() == ref.keys() and ours
        for k in ours:
            assert (ours[k] - ref[k]).abs().max().item() <= ADAK_TOL, (stage, k)
        assert any((v != 0).any() for v in ours.values()), "the allocators did not train"
