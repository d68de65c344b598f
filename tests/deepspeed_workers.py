"""Rank-side code of the DeepSpeed engine tests (tests/test_deepspeed.py): one spawn per world size runs every job.

Each job is a list of moe_train configs trained one after the other on one set of process groups (a ParallelContext
per ep; DeepSpeed's groups are made once per ep and reused); the ranks return nothing but the wall time, the
pytest side reads the runs' metrics.jsonl and model files. The reference of every DeepSpeed run is the same config
under the FSDP2 engine (parallel.engine: fsdp), trained in the same spawn.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from moe_train.config import Config, ModelConfig, from_dict, validate


def tiny_topk_model(path: str, seed: int = 0) -> None:
    """A tiny top-2 model.pt for Ada-K's train.init_from (rank 0 writes it; every rank waits)."""
    from moe_train.config import MoEConfig
    from moe_train.io.model_file import save_model
    from moe_train.model import build_model

    if dist.get_rank() == 0:
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                          num_kv_heads=1, max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2))
        save_model(build_model(cfg), path, step=0)
    dist.barrier()


def train_jobs(cfg_dicts: list[dict], topk_model: str | None = None) -> dict:
    """Trains every config in order (``train`` or, with an adak section in use, ``adak``: cfg["job"])."""
    from moe_train.parallel.distributed import init_distributed
    from moe_train.train.adak import train_adak
    from moe_train.train.trainer import train

    out = {"seconds": []}
    contexts = {}
    for d in cfg_dicts:
        d = copy.deepcopy(d)
        job = d.pop("job", "train")
        cfg = from_dict(Config, d)
        validate(cfg)
        key = (cfg.parallel.ep, cfg.parallel.global_aux_loss)
        if key not in contexts:
            contexts[key] = init_distributed(cfg.parallel, cfg.model.moe.num_experts)
        if topk_model is not None and not out.get("model_written"):
            tiny_topk_model(topk_model)
            out["model_written"] = True
        start = time.perf_counter()
        try:
            (train_adak(cfg, ctx=contexts[key]) if job == "adak" else train(cfg, contexts[key]))
            out.setdefault("errors", []).append(None)
        except ValueError as e:  # a refused combination: every rank must refuse, with the same message
            out.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        out["seconds"].append(time.perf_counter() - start)
    return out
