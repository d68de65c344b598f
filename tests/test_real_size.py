"""The real-size path (train/build.py): each rank builds the model on the meta device, shards it and materialises
only its own shards, filled fresh, from a Hugging Face folder or from a model.pt, converted on load.

  * fresh: the same seed gives the same model at 1, 2 and 4 ranks (ep 1 / 2 / 4), equal to build_model in one
    process (model/init.py: one generator per tensor);
  * from a transformers-made Mixtral folder, converted to AdaMoE on load, LoRA on experts and attention: every rank
    holds its block of experts and its FSDP slice, and the gathered model equals the one-process load (the same
    values, read shard-wise);
  * bf16: the frozen weights are stored in bf16 (no fp32 master), the trainable ones stay fp32;
  * memory: a run's peak resident memory per rank above its imports, measured against the same run of a model
    with 1/8 of the parameters (the fixed overhead), stays within 2x the rank's share of the weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import real_size_workers as RW
import torch

from moe_train.config import apply_overrides, load_config
from moe_train.train.build import build_job_model

import ep_workers as W

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CONFIG = str(REPO / "configs" / "tiny_adamoe.yaml")


def _reference(overrides: list[str]) -> dict:
    cfg = apply_overrides(load_config(CONFIG), overrides)
    torch.manual_seed(cfg.train.seed)
    return build_job_model(cfg).state_dict()


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    bad = [k for k in want if not torch.equal(got[k].float(), want[k].float())]
    assert not bad, f"{what}: {bad}"


def test_fresh_model_is_the_same_at_1_2_and_4_ranks(tmp_path):
    from moe_train.model import build_model

    cfg = load_config(CONFIG)
    torch.manual_seed(cfg.train.seed)
    whole = build_model(cfg.model).state_dict()  # the plain build: reset_parameters, same rule
    assert torch.equal(whole["layers.0.moe.experts.w_gate"], _reference([])["layers.0.moe.experts.w_gate"])
    for world in (1, 2, 4):
        (tmp_path / str(world)).mkdir()
        ranks = W.spawn(RW.built_state, world, tmp_path / str(world), config_path=CONFIG, overrides=[], ep=world)
        for r in ranks:
            _assert_same(r["state"], whole, f"{world} ranks")
        if world > 1:  # each rank holds its own experts only (and its FSDP slice of them)
            assert ranks[0]["local"]["layers.0.moe.experts.w_gate"][0] == 8 // world


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("mixtral") / "hf"
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_hf_folder_converted_on_load_with_lora_equals_the_one_process_load(mixtral_folder, tmp_path):
    overrides = [f"train.init_from={mixtral_folder}", "train.lora_rank=4",
                 'train.trainable=["router\\\\.", "lora_"]']
    want = _reference(overrides)
    assert "layers.0.moe.router.null_gate.weight" in want  # converted to AdaMoE on load
    # the null gate is AdaMoE's function-preserving copy of the true gate (16 null = 2 x 8 true)
    gate = want["layers.0.moe.router.gate.weight"]
    assert torch.equal(want["layers.0.moe.router.null_gate.weight"], gate.repeat(2, 1))
    ranks = W.spawn(RW.built_state, 2, tmp_path, config_path=CONFIG, overrides=overrides, ep=2)
    for r in ranks:
        _assert_same(r["state"], want, "ep 2 from a Hugging Face folder")
        assert r["local"]["layers.1.moe.experts.w_up"][0] == 4 and r["local"]["layers.1.moe.experts.lora_up_A"][0] == 4
        assert r["trainable"] and all("lora_" in n or "router." in n for n in r["trainable"])


def test_bf16_stores_frozen_weights_in_bf16_and_keeps_fp32_masters(mixtral_folder):
    cfg = apply_overrides(load_config(CONFIG), [f"train.init_from={mixtral_folder}", "train.lora_rank=4",
                                                'train.trainable=["router\\\\.", "lora_"]', "train.precision=bf16"])
    torch.manual_seed(0)
    model = build_job_model(cfg)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert trainable and set(trainable.values()) == {torch.float32}


def test_peak_memory_per_rank_stays_near_its_share(tmp_path):
    """ep 4 on 4 gloo ranks, a 56M-parameter Mixtral folder converted to AdaMoE with LoRA, one step, final model.pt
    and HF export: each rank's peak above its imports, less the same job's on a model of the same layout with tiny
    widths (the fixed overhead: process groups, data, FSDP state), is within 2x the rank's share of the weights
    (the whole model / 4; the old path held ~2.5x the WHOLE model)."""
    import sys

    sys.path.insert(0, str(BENCH))  # bench/startup_memory.py (no bench module shadows a package: test_layout.py)
    import startup_memory as SM

    big = SM.measure(256, 512, 16, 4096, world=4, ep=4, work=tmp_path / "big")
    small = SM.measure(32, 32, 16, 4096, world=4, ep=4, work=tmp_path / "small")
    share = big["model_mb"] / 4
    for b, s in zip(big["ranks"], small["ranks"]):
        grown = (b["peak_mb"] - b["base_mb"]) - (s["peak_mb"] - s["base_mb"])
        assert grown <= 2 * share, (b, s, share)
        assert grown >= 0.5 * share  # the rank does hold its share: the measurement sees the weights
