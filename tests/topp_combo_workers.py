"""Rank-side code of tests/test_topp_combos.py: one spawn of 2 gloo ranks runs several trainer jobs in sequence
(each on its own port, as miniature_workers does) and records, per job, how many MoE forwards went through the
chunked all-to-all overlap (parallel/overlap.py), so the test knows the overlap path really ran."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from miniature_workers import free_ports


def _entry(rank: int, world: int, jobs: list[dict]) -> None:
    import torch

    from moe_train.config import Config, from_dict
    from moe_train.parallel import dispatcher as dispatcher_mod
    from moe_train.train.trainer import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    real = dispatcher_mod.overlapped_experts
    calls = [0]

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    dispatcher_mod.overlapped_experts = counted
    try:
        for job in jobs:
            os.environ["MASTER_PORT"] = str(job["port"])
            calls[0] = 0
            cfg = from_dict(Config, job["cfg"])
            train(cfg)
            if rank == 0:
                Path(cfg.train.out_dir, "overlap_calls.json").write_text(json.dumps({"calls": calls[0]}))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dispatcher_mod.overlapped_experts = real


def run_jobs(world: int, jobs: list[dict]) -> None:
    """``jobs``: [{"cfg": to_dict(Config)}]; each gets a fresh port."""
    import torch.multiprocessing as mp

    for job, port in zip(jobs, free_ports(len(jobs))):
        job["port"] = port
    mp.spawn(_entry, args=(world, jobs), nprocs=world, join=True)
