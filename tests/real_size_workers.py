"""Rank-side code of tests/test_real_size.py (spawned by ep_workers.spawn on gloo ranks)."""

from __future__ import annotations

import resource

import torch

from moe_train.config import apply_overrides, load_config
from moe_train.parallel.state import full_state_dict
from moe_train.train.build import build_job_model

import ep_workers as W


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def built_state(config_path: str, overrides: list[str], ep: int) -> dict:
    """The job's model built rank by rank (train/build.py), gathered whole on every rank, and which experts this rank
    holds."""
    cfg = apply_overrides(load_config(config_path), [*overrides, f"parallel.ep={ep}"])
    ctx = W._ctx(ep, cfg.model.moe.num_experts)
    torch.manual_seed(cfg.train.seed)
    model = build_job_model(cfg, ctx)
    local = {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
             for n, p in model.named_parameters()}
    return {"state": full_state_dict(model, ctx), "local": local, "config": model.config,
            "dtypes": {n: p.dtype for n, p in model.named_parameters()},
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def train_peak(overrides: list[str]) -> dict:
    """One CLI-equivalent training run (build, steps, final model.pt, HF export on rank 0): this rank's resident
    memory after the imports, and its peak (Linux ru_maxrss), in MiB."""
    from moe_train.train.trainer import train

    base = _rss_mb()
    cfg = apply_overrides(load_config(overrides[0]), overrides[1:])
    train(cfg)
    return {"base_mb": base, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
