"""The top-p router and the all-to-all overlap against the features they meet.

1. top-p x checkpoint / resume x HF export (one process): a run checkpointed at step 2 and resumed from that DCP
   checkpoint in a fresh out_dir continues the uninterrupted run's trajectory bit for bit (losses and final
   parameters equal exactly: same world, same order of operations); the run's train.export_hf folder loads back
   through from_hf (the top-p MoEConfig rides under config.json's "moe_train" key) with logits equal to the final
   model's.
2. parallel.a2a_overlap_chunks: 2 in real 2-rank trainer runs (ep 2, top-p router: variable k with -1 slots)
   with capacity_factor, LoRA (attention + experts), grad_accum_steps 2, fp32 and bf16 (FSDP2 policy), against the
   same runs with the overlap off (the plain AllToAllDispatcher, itself checked against the single process in
   tests/test_combinations.py). The overlap computes the same rows in smaller expert groups, so fp32 agrees to
   summation order (losses 1e-6, parameters FP32_TOL: AdamW amplifies); bf16 within the bf16 spread measured in tests/test_combinations.py. A counter on
   overlapped_experts proves the overlap path ran (and only where asked).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_combinations import BF16_LOSS_TOL, BF16_PARAM_TOL, FP32_TOL

from moe_train.config import Config, from_dict, to_dict, validate

import topp_combo_workers as W

STEPS, RESUME_AT = 4, 2
# fp32 losses: to summation order (measured: equal to the last bit at these sizes). fp32 parameters after 3 AdamW
# steps: FP32_TOL (1e-4) as in test_combinations - AdamW's m / sqrt(v) turns ~1e-9 gradient differences of
# near-zero gradient elements into ~1e-5 steps (measured: 27 of 4096 merged expert weights of one layer moved by
# > 1e-6, at most 1.3e-5; every other parameter < 1e-6).
FP32_OVERLAP_TOL = 1e-6


def topp_config(out: Path, **train_kw) -> Config:
    moe = {"router": "top_p", "num_experts": 4, "top_k": 2, "top_p": 0.6, "k_max": 3, "entropy_loss_coef": 0.01,
           "aux_loss_coef": 0.01, "z_loss_coef": 0.001}
    train = {"steps": STEPS, "batch_size": 8, "seq_len": 16, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
             "tensorboard": False, "out_dir": str(out), "keep_last": 0, "seed": 3}
    train.update(train_kw)
    cfg = from_dict(Config, {
        "model": {"family": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64, "moe": moe},
        "train": train, "data": {"kind": "synthetic", "num_sequences": 64, "val_sequences": 4, "seed": 11}})
    validate(cfg)
    return cfg


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "val_loss" not in r and "loss" in r and "step" in r}


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final" / "model.pt", map_location="cpu", weights_only=True)["model"]


def _logits(model, ids):
    out = model(ids)
    return out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)


def test_top_p_resume_is_bit_exact_and_hf_export_round_trips(tmp_path):
    from moe_train.io.hf import from_hf
    from moe_train.io.model_file import load_model
    from moe_train.train.trainer import train

    full = topp_config(tmp_path / "full", checkpoint_every=RESUME_AT, export_hf=True)
    train(full)
    resumed = copy.deepcopy(full)
    resumed.train.out_dir = str(tmp_path / "resumed")
    resumed.train.resume_from = str(tmp_path / "full" / "checkpoints" / f"step_{RESUME_AT:08d}")
    train(resumed)

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == list(range(RESUME_AT + 1, STEPS + 1))
    assert all(b[s] == a[s] for s in b), (a, b)
    pa, pb = _final(tmp_path / "full"), _final(tmp_path / "resumed")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)

    trained = load_model(tmp_path / "full" / "final" / "model.pt").eval()
    back = from_hf(tmp_path / "full" / "hf").eval()
    assert back.config.moe == trained.config.moe and back.config.moe.router == "top_p"
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(_logits(back, ids), _logits(trained, ids))


def overlap_config(out: Path, chunks: int, bf16: bool) -> Config:
    cfg = topp_config(out, grad_accum_steps=2, precision="bf16" if bf16 else "fp32", lora_rank=4,
                      lora_targets=["attention", "experts"], trainable=["router\\.", "lora_"])
    cfg.train.steps = 3
    cfg.model.moe.capacity_factor = 1.0
    cfg.parallel.ep = 2
    cfg.parallel.a2a_overlap_chunks = chunks
    validate(cfg)
    return cfg


CASES = [(chunks, bf16) for bf16 in (False, True) for chunks in (1, 2)]


def _name(chunks: int, bf16: bool) -> str:
    return f"c{chunks}-{'bf16' if bf16 else 'fp32'}"


@pytest.fixture(scope="module")
def overlap_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("topp_overlap")
    W.run_jobs(2, [{"cfg": to_dict(overlap_config(root / _name(*c), *c))} for c in CASES])
    return root


@pytest.mark.parametrize("bf16", (False, True), ids=("fp32", "bf16"))
def test_a2a_overlap_equals_plain_all_to_all_in_training(overlap_runs, bf16):
    plain, over = overlap_runs / _name(1, bf16), overlap_runs / _name(2, bf16)
    assert json.loads((plain / "overlap_calls.json").read_text())["calls"] == 0
    assert json.loads((over / "overlap_calls.json").read_text())["calls"] > 0
    loss_tol, param_tol = (BF16_LOSS_TOL, BF16_PARAM_TOL) if bf16 else (FP32_OVERLAP_TOL, FP32_TOL)
    a, b = _losses(plain), _losses(over)
    assert a.keys() == b.keys() and sorted(a) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) <= loss_tol * max(1.0, abs(a[s])), (s, a[s], b[s])
    pa, pb = _final(plain), _final(over)
    assert pa.keys() == pb.keys()
    for k in pa:
        err = (pa[k].float() - pb[k].float()).abs().max().item() if pa[k].numel() else 0.0
        assert err <= param_tol * max(1.0, pa[k].float().abs().max().item()), (k, err)
