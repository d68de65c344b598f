"""Rank-side code of the miniature tests: one spawn of a world of gloo ranks runs several jobs in sequence (each job
creates and tears down its own process groups on its own port), so the ranks import torch once for all of them.
The pytest side reads what the jobs wrote (metrics.jsonl, checkpoints, final models, HF exports)."""

from __future__ import annotations

import os
import socket
import traceback


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))  # every address: the rendezvous listens on all of them (a port free on 127.0.0.1 only is not)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _entry(rank: int, world: int, jobs: list[dict]) -> None:
    import torch

    from moe_train.config import Config, from_dict

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    try:
        for job in jobs:
            os.environ["MASTER_PORT"] = str(job["port"])
            cfg = from_dict(Config, job["cfg"])
            if job["command"] == "adak":
                from moe_train.train.adak import train_adak

                train_adak(cfg)
            else:
                from moe_train.train.trainer import train

                train(cfg)
    except Exception:
        traceback.print_exc()
        raise


def run_jobs(world: int, jobs: list[dict]) -> None:
    """``jobs``: [{"command": "train" | "adak", "cfg": to_dict(Config)}]; each gets a fresh port."""
    import torch.multiprocessing as mp

    for job, port in zip(jobs, free_ports(len(jobs))):
        job["port"] = port
    mp.spawn(_entry, args=(world, jobs), nprocs=world, join=True)
