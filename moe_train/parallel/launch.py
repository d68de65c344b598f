"""From a launcher's environment (torchrun, Slurm srun, mpirun) to the torch.distributed variables, and the
topology a launch resolves to (the dry run).

torch.distributed needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (moe_train.parallel.distributed).
    torchrun          sets them itself: used as they are.
    mpirun (Open MPI) OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK; MPICH/Intel/PMIx: PMI_RANK / PMI_SIZE /
                      MPI_LOCALRANKID. The master address is rank 0's host name, broadcast with mpi4py (MPI gives
                      rank/size/master, torch.distributed does the rest).
    srun (a task per GPU, no torchrun)
                      SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; master = first host of SLURM_JOB_NODELIST.
MASTER_PORT defaults to 29500 when the launcher does not set it. Variables already set are never overridden.

When the launcher dies (die_with_launcher): a worker that outlives it keeps training and saving, and a restart
then makes a second writer, so each worker asks the kernel for SIGTERM when its parent dies (Linux
prctl(PR_SET_PDEATHSIG)), only where the parent IS the launcher:
    torchrun          the worker's parent is the elastic agent (the torchrun process): set.
    mpirun            the parent is mpirun or the MPI daemon (orted / prted) on each node: set. Open MPI also kills
                      its ranks itself when mpirun goes, this covers the daemon being SIGKILLed.
    srun              the parent is slurmstepd, which Slurm keeps and which ends the tasks with the step (scancel,
                      time limit, a killed srun): Slurm's own mechanism, nothing set.
    no launcher       a plain `moe-train train` (its parent is a shell, nohup, tmux...): nothing set, so closing a
                      terminal never kills a run that was meant to outlive it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

from moe_train.parallel.layout import validate_layout

DEFAULT_PORT = "29500"
PR_SET_PDEATHSIG = 1  # linux/prctl.h

log = logging.getLogger(__name__)


def launcher_of(env: Mapping[str, str]) -> Optional[str]:
    """The launcher that started this process as a worker and is its parent, or None (module docstring)."""
    if "TORCHELASTIC_RUN_ID" in env:  # set by torchrun's agent for its workers only
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpirun"
    return None


def die_with_launcher(env: Optional[Mapping[str, str]] = None) -> bool:
    """SIGTERM to this process when its parent (the launcher) dies; True when set. Linux only; idempotent.

    The kernel sends the signal when the parent exits; if the parent died before this call, it never will, so
    the parent is checked again after setting it: a worker orphaned meanwhile (re-parented) stops now. (Not
    "parent is pid 1": in a container torchrun itself may be pid 1. A launcher gone before the first getppid
    cannot be told apart here; then the rendezvous fails, torchrun's agent store having gone with it.)"""
    env = os.environ if env is None else env
    launcher = launcher_of(env)
    if launcher is None or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this worker will not stop by "
                    f"itself if {launcher} dies")
        return False
    if os.getppid() != parent:
        log.error(f"the {launcher} launcher that started this worker is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list, e.g. 'gpu[01-02,07],login1' -> ['gpu01', 'gpu02', 'gpu07', 'login1']."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _mpi_master_addr() -> str:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("launching with mpirun needs mpi4py to find rank 0's host: pip install mpi4py "
                          "(or export MASTER_ADDR yourself)") from e
    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def resolve_launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables this launch implies (empty for a single process or when already set)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    out: dict[str, str] = {}
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        ompi = "OMPI_COMM_WORLD_RANK" in env
        out["RANK"] = env["OMPI_COMM_WORLD_RANK" if ompi else "PMI_RANK"]
        out["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE" if ompi else "PMI_SIZE"]
        out["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK" if ompi else "MPI_LOCALRANKID", "0")
        if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = _mpi_master_addr()
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        out["RANK"], out["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
    else:
        return {}
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = DEFAULT_PORT
    return out


def launch_rank(env: Mapping[str, str]) -> int:
    """This process's global rank as its launcher set it (torchrun, mpirun, srun), 0 without a launcher."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if env.get("SLURM_PROCID", "").isdigit() and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"])
    return 0


def apply_launch_env(env: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Exports what resolve_launch_env finds into ``env`` (os.environ by default); returns what it set."""
    env = os.environ if env is None else env
    found = resolve_launch_env(env)
    env.update(found)
    return found


@dataclass
class Topology:
    nodes: list[str]
    procs_per_node: int
    ep: int
    num_experts: int

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.procs_per_node

    def describe(self) -> str:
        """Nodes, ranks and the dp x ep layout: which experts each rank holds, which ranks share them."""
        validate_layout(self.world_size, self.ep, self.num_experts)
        world, ep = self.world_size, self.ep
        per = self.num_experts // ep
        lines = [f"nodes {len(self.nodes)} x {self.procs_per_node} processes = world {world}; "
                 f"mesh (dp={world // ep}, ep={ep}); {self.num_experts} experts, {per} per rank; "
                 f"expert-data-parallel groups of {world // ep}"]
        for rank in range(world):
            node, local = divmod(rank, self.procs_per_node)
            dp_idx, ep_idx = divmod(rank, ep)
            lines.append(f"rank {rank:>4}  node {self.nodes[node]} local {local}  ep group {dp_idx} ep rank {ep_idx}"
                         f"  experts [{ep_idx * per}, {(ep_idx + 1) * per})")
        return "\n".join(lines)


def topology_from_env(env: Mapping[str, str], ep: int, num_experts: int, procs_per_node: Optional[int] = None,
                      nnodes: Optional[int] = None) -> Topology:
    """The topology of a launch: Slurm allocation variables, else torchrun's / MPI's, else the given node and
    process counts (a plan for a launch that has not happened yet), else one process."""
    if "SLURM_JOB_NODELIST" in env:
        nodes = expand_nodelist(env["SLURM_JOB_NODELIST"])
        if procs_per_node is None:
            gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "").split(":")[-1] or None
            per_task = env.get("SLURM_NTASKS_PER_NODE")
            procs_per_node = int(gpus) if gpus else int(per_task) if per_task else 1
        return Topology(nodes, procs_per_node, ep, num_experts)
    resolved = {**env, **resolve_launch_env(env)}
    if "WORLD_SIZE" not in resolved:
        n, per = nnodes or 1, procs_per_node or 1
        return Topology([f"node{i}" for i in range(n)], per, ep, num_experts)
    world = int(resolved["WORLD_SIZE"])
    per = procs_per_node or int(resolved.get("LOCAL_WORLD_SIZE", resolved.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)))
    if world % per:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of {per} processes per node")
    return Topology([f"node{i}" for i in range(world // per)], per, ep, num_experts)
