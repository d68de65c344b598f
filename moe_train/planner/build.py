"""The job's model at real size on the meta device, prepared exactly as the job prepares it (train/build.py).

    train  train/build.py build_job_model: build_model (null router as configured: the AdaMoE conversion of a top-k
           checkpoint yields the same modules), apply_trainable (LoRA, freezing), the activation_checkpointing flag,
           then the SAME ``_frozen_to`` the job runs: frozen parameters in the compute dtype (bf16 under bf16
           precision: no fp32 master, no gradient, no optimizer state), trainable ones fp32 masters; bf16 compute
           through FSDP2's MixedPrecisionPolicy (world > 1) or autocast (world 1).
    adak   train/adak.py load_adak_model: the top-k base with add_allocators, every base parameter frozen
           (freeze_base), the base in adak.dtype by the same ``_frozen_to`` (``stored`` is planned as bf16, the
           dtype Hugging Face Mixtral / Qwen folders ship), allocators fp32; parallelize_model without a param dtype
           (the base computes in its own dtype).
The planner plans a GPU job: ``train.precision: auto`` resolves to bf16 as it does on CUDA (train/build.py
_compute_dtype on a CUDA device). The steps after sharding (to_empty, filling the shards) hold no model-sized
state beyond the shards; planner/startup.py plans their transients.
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
from moe_train.routing.registry import router_class
from moe_train.train.build import _compute_dtype, _frozen_to  # the job's own dtype rules, not a copy of them

JOBS = ("train", "adak")
PLANNED_DEVICE = torch.device("cuda")  # a device object only: nothing is allocated on it


@dataclass
class JobModel:
    model: nn.Module
    job: str
    param_dtype: Optional[torch.dtype]  # FSDP2 compute dtype (None: the parameters' own)
    bf16: bool  # compute in bf16 (FSDP2 policy, autocast, or a bf16 base)
    autocast: bool  # single process bf16 over fp32 weights (torch.autocast)
    activation_checkpointing: bool


def bf16_planned(cfg: Config) -> bool:
    return _compute_dtype(cfg, PLANNED_DEVICE) == torch.bfloat16  # auto = bf16 on CUDA


def build_job_model(cfg: Config, job: str, world: int) -> JobModel:
    if job not in JOBS:
        raise ValueError(f"--job {job!r}: one of {JOBS}")
    if job == "adak":
        return _adak_model(cfg, world)
    with torch.device("meta"):
        model = build_model(cfg.model)
        apply_trainable(model, cfg)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    _frozen_to(model, _compute_dtype(cfg, PLANNED_DEVICE))
    bf16 = bf16_planned(cfg)
    distributed = world > 1
    return JobModel(model=model, job=job, param_dtype=torch.bfloat16 if bf16 and distributed else None, bf16=bf16,
                    autocast=bf16 and not distributed, activation_checkpointing=cfg.train.activation_checkpointing)


def _adak_model(cfg: Config, world: int) -> JobModel:
    base_cfg = cfg.model
    why = router_class(base_cfg.moe.router).adak_base_reason(base_cfg.moe)  # '' for a base the adak job converts
    if why:
        raise ValueError(f"an Ada-K plan starts from a base model the adak job converts (top-k, or null experts of "
                         f"kind identity / constant); model.moe: {why}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "stored": torch.bfloat16}[cfg.adak.dtype]
    with torch.device("meta"):
        model = build_model(dataclasses.replace(base_cfg))
        add_allocators(model, cfg.adak.k_min, cfg.adak.k_max)
        freeze_base(model)
    _frozen_to(model, dtype)  # allocators stay fp32 masters (train/build.py's rule)
    return JobModel(model=model, job="adak", param_dtype=None, bf16=dtype == torch.bfloat16, autocast=False,
                    activation_checkpointing=False)
