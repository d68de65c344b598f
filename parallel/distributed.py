"""Process-group setup from the launch environment.

ParallelContext is what the rest of the system sees: sizes, ranks, device and the process groups.
Single process (no WORLD_SIZE, or WORLD_SIZE=1 and ep=1): no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_train.config import ParallelConfig


@dataclass
class ParallelContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_size: int = 1  # every rank is a data-parallel rank (expert parallel borrows from it)
    dp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Optional[Any] = None  # torch.distributed DeviceMesh when distributed
    ep_group: Optional[Any] = None
    edp_group: Optional[Any] = None  # expert-data-parallel group: ranks holding the same expert shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: ParallelConfig, num_experts: int) -> ParallelContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world == 1 and cfg.ep == 1:
        return ParallelContext(device=device)
    raise ValueError(f"parallel.ep={cfg.ep} with WORLD_SIZE={world}: multi-process runs need the expert-parallel "
                     "runtime (moe_train.parallel), which is not built yet")
