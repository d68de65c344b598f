"""The job's model at real size on the meta device, prepared exactly as the job prepares it.

    train  moe_train/train/trainer.py: build_model (null router as configured: the AdaMoE conversion of a top-k
           checkpoint yields the same modules), apply_trainable (LoRA, freezing), activation_checkpointing flag,
           fp32 parameters; bf16 compute through FSDP2's MixedPrecisionPolicy (world > 1) or autocast (world 1).
    adak   moe_train/train/adak.py: the top-k base with add_allocators, the base cast to adak.dtype (``stored`` is
           planned as bf16, the dtype Hugging Face Mixtral / Qwen folders ship), every base parameter frozen,
           allocators fp32; parallelize_model without a param dtype (the base computes in its own dtype).
The planner plans a GPU job: ``train.precision: auto`` resolves to bf16 as it does on CUDA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moe_train.config import Config
from moe_train.io.adak_convert import add_allocators
from moe_train.model import build_model
from moe_train.model.trainable import apply_trainable, freeze_base

JOBS = ("train", "adak")


@dataclass
class JobModel:
    model: nn.Module
    job: str
    param_dtype: Optional[torch.dtype]  # FSDP2 compute dtype (None: the parameters' own)
    bf16: bool  # compute in bf16 (FSDP2 policy, autocast, or a bf16 base)
    autocast: bool  # single process bf16 over fp32 weights (torch.autocast)
    activation_checkpointing: bool


def bf16_planned(cfg: Config) -> bool:
    return cfg.train.precision in ("bf16", "auto")  # auto = bf16 on CUDA (trainer.bf16_compute)


def build_job_model(cfg: Config, job: str, world: int) -> JobModel:
    if job not in JOBS:
        raise ValueError(f"--job {job!r}: one of {JOBS}")
    if job == "adak":
        return _adak_model(cfg, world)
    with torch.device("meta"):
        model = build_model(cfg.model)
        apply_trainable(model, cfg)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    bf16 = bf16_planned(cfg)
    distributed = world > 1
    return JobModel(model=model, job=job, param_dtype=torch.bfloat16 if bf16 and distributed else None, bf16=bf16,
                    autocast=bf16 and not distributed, activation_checkpointing=cfg.train.activation_checkpointing)


def _adak_model(cfg: Config, world: int) -> JobModel:
    base_cfg = cfg.model
    if base_cfg.moe.router != "topk":
        raise ValueError(f"an Ada-K plan starts from a top-k base model; model.moe.router is "
                         f"{base_cfg.moe.router!r} (the adak job converts a top-k checkpoint)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "stored": torch.bfloat16}[cfg.adak.dtype]
    with torch.device("meta"):
        model = build_model(dataclasses.replace(base_cfg))
        model.to(dtype)
        add_allocators(model, cfg.adak.k_min, cfg.adak.k_max)
        freeze_base(model)
    return JobModel(model=model, job="adak", param_dtype=None, bf16=dtype == torch.bfloat16, autocast=False,
                    activation_checkpointing=False)
