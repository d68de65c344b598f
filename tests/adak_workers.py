"""Rank-side code of the distributed Ada-K tests (tests/test_adak_distributed.py), spawned through
tests/ep_workers.py's ``spawn`` (gloo, CPU, 1 thread per rank).

Each job is the real ``train_adak`` on the tiny base saved by the test (``train.init_from``), so the data sharding,
the warm start, PPO, the optimizer and the checkpoint are the library's own. The single-process reference runs in
the pytest process with the same configs; the ranks return the full allocator weights (gathered from the FSDP2
shards) and what lies inside the sharded model after the run.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from moe_train.config import AdaKConfig, Config, ModelConfig, MoEConfig, TrainConfig

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
            max_seq_len=16)
ALLOCATOR = "moe.router.allocator.weight"


def base_model():
    """The frozen top-2 base every job starts from (random weights: the allocators only need its router)."""
    from moe_train.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, moe=MoEConfig(num_experts=4, top_k=2)))


def job_config(init_from: str, out_dir: str, *, warm: int, ppo: int, ep: int = 1, dtype: str = "float32",
               batch: int = 4, minibatches: int = 1) -> Config:
    """Global batch ``batch`` x 16 tokens (rank r of n takes sequences [batch*r/n, batch*(r+1)/n)); lr 0.05 so a
    few steps move the 32-wide allocators well above fp32 rounding; the greedy baseline, 2 PPO epochs of
    ``minibatches`` AdamW steps, clipping and an entropy bonus all take part."""
    cfg = Config(model=ModelConfig(**TINY, moe=MoEConfig(num_experts=4, top_k=2)),
                 train=TrainConfig(init_from=init_from, batch_size=batch, seq_len=16, out_dir=out_dir,
                                   log_every=1000, seed=3, grad_clip=1.0),
                 adak=AdaKConfig(k_max=4, warm_start_steps=warm, ppo_steps=ppo, lr=0.05, dtype=dtype,
                                 baseline="greedy", ppo_epochs=2, ppo_minibatches=minibatches, entropy_coef=0.01))
    cfg.parallel.ep = ep
    cfg.parallel.rendezvous_timeout_s = 60
    cfg.data.num_sequences, cfg.data.val_sequences = 16, 0  # no validation set: the jobs only train
    return cfg


def _stranded_grads(model) -> list[str]:
    """Unsharded FSDP2 parameters still holding a gradient (one FSDP never reduced into the sharded .grad).

    Reads FSDP2's private FSDPParam._unsharded_param (torch 2.13): there is no public view of it."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fp in group.fsdp_params:
                    up = getattr(fp, "_unsharded_param", None)
                    if up is not None and up.grad is not None:
                        out.append(fp._param_fqn)
    return out


def run_jobs(ep: int, jobs: list[dict]) -> dict:
    """Each job {"name", "cfg"} (a config dict): train_adak on this rank's share; returns per job the full
    allocator weights, the metrics train_adak returned, the local allocator shard's dtype and the stranded grads."""
    from moe_train.config import from_dict, validate
    from moe_train.parallel.distributed import init_distributed
    from moe_train.parallel.state import full_state_dict
    from moe_train.train.adak import load_adak_model, train_adak

    ctx = None
    out = {}
    for job in jobs:
        cfg = from_dict(Config, copy.deepcopy(job["cfg"]))
        validate(cfg)
        if ctx is None:
            ctx = init_distributed(cfg.parallel, cfg.model.moe.num_experts)
            assert ctx.ep_size == ep
        model = load_adak_model(cfg)
        train_adak(cfg, model, ctx)
        sd = full_state_dict(model, ctx)
        local = [layer.moe.router.allocator.weight for layer in model.layers]
        out[job["name"]] = {
            "allocators": {k: v.clone() for k, v in sd.items() if k.endswith(ALLOCATOR)},
            "allocator_dtypes": sorted({str(getattr(p, "_local_tensor", p).dtype) for p in local}),
            "base_dtypes": sorted({str(v.dtype) for k, v in sd.items() if "allocator" not in k
                                   and v.is_floating_point()}),
            "stranded": _stranded_grads(model),
            "base_grads": [n for n, p in model.named_parameters() if p.grad is not None and "allocator" not in n],
        }
    dist.barrier()
    return out
