"""Bad launches fail fast, before any process group exists, with a message that names the problem."""

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from moe_train.config import ParallelConfig
from moe_train.parallel.distributed import RendezvousError, init_distributed

from ep_workers import free_port


def _env(world, rank=0, port=None):
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    if port is not None:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


@pytest.mark.parametrize("world,ep,experts,needle", [
    (3, 2, 8, "WORLD_SIZE=3 is not divisible by parallel.ep=2"),
    (4, 8, 4, "parallel.ep=8 exceeds model.moe.num_experts=4"),
    (6, 3, 8, "num_experts=8 is not divisible by parallel.ep=3"),
    (1, 2, 8, "WORLD_SIZE=1 is not divisible by parallel.ep=2"),
])
def test_layout_errors_come_before_any_process_group(world, ep, experts, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        init_distributed(ParallelConfig(ep=ep), experts, env=_env(world, port=free_port()))
    assert not dist.is_initialized()


def test_missing_master_address_is_named():
    with pytest.raises(ValueError, match="MASTER_ADDR / MASTER_PORT are not set"):
        init_distributed(ParallelConfig(ep=2), 8, env=_env(2))
    assert not dist.is_initialized()


def test_single_process_needs_no_group():
    ctx = init_distributed(ParallelConfig(ep=1), 8, env={})
    assert not ctx.distributed and ctx.mesh is None and not dist.is_initialized()


@pytest.mark.parametrize("rank", [1, 0])  # a worker that cannot reach rank 0; rank 0 whose peers never come
def test_unreachable_rendezvous_fails_fast_naming_the_address(rank):
    port = free_port()  # nobody listens there
    start = time.perf_counter()
    with pytest.raises(RendezvousError, match=f"MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} within 2 s"):
        init_distributed(ParallelConfig(ep=2, rendezvous_timeout_s=2), 8, env=_env(2, rank, port))
    assert time.perf_counter() - start < 15
    assert not dist.is_initialized()


def test_cli_reports_a_bad_launch_in_one_line(tmp_path):
    env = dict(os.environ, **_env(3, port=free_port()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "moe_train.cli", "train", "--config", "configs/tiny_top2.yaml",
                           "--set", "parallel.ep=2", "--set", f"train.out_dir={tmp_path}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "WORLD_SIZE=3 is not divisible by parallel.ep=2" in proc.stderr
    assert "Traceback" not in proc.stderr
