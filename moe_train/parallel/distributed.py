"""Process groups from the launch environment: one DeviceMesh with named dims (dp, ep), a rendezvous that fails fast.

Layout (ranks row-major on the mesh, rank = dp_idx * ep + ep_idx):

    mesh dim "ep"  ep consecutive ranks; between them they hold all E experts (E/ep each, contiguous) and exchange
                   tokens with all-to-all.                                                  -> ctx.ep_group
    mesh dim "dp"  the world/ep ranks with the same ep coordinate, i.e. holding the same expert shard: the
                   expert-data-parallel group that expert gradients are reduced over.       -> ctx.edp_group
    world_mesh     every rank (a 1-D mesh over the default group). Expert parallelism borrows from data
                   parallelism: every rank runs its own micro-batch (dp_size = world), and the non-expert
                   gradients are reduced over all ranks.
    tp             reserved (attention is not sharded yet; it would become the innermost mesh dim).

The rank and world come only from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT: torchrun sets them,
Slurm and MPI launch scripts export them (launch/). Single process (WORLD_SIZE unset or 1, ep=1): no process group.
Backend: NCCL with one GPU per rank (cuda:LOCAL_RANK) when CUDA is available, gloo on CPU otherwise.

init_distributed / destroy_distributed make and tear down the groups; ``distributed(...)`` is the one context
manager a job runs in (it tears the groups down also when the job fails). What the groups are used for lives beside:
parallelize.py (expert shards, FSDP2), dispatcher.py (all-to-all), collectives.py, state.py.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from moe_train.config import ParallelConfig
from moe_train.parallel.launch import die_with_launcher
from moe_train.parallel.layout import validate_layout


class RendezvousError(RuntimeError):
    """The ranks could not meet at MASTER_ADDR:MASTER_PORT within parallel.rendezvous_timeout_s."""


class StartRefused(ValueError):
    """Rank 0 refused to start (e.g. another run holds out_dir): every other rank fails with rank 0's message."""


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
    mesh: Optional[Any] = None  # torch.distributed DeviceMesh when distributed, dims ("dp", "ep")
    ep_group: Optional[Any] = None
    edp_group: Optional[Any] = None  # expert-data-parallel group: ranks holding the same expert shard
    edp_size: int = 1
    edp_rank: int = 0
    world_mesh: Optional[Any] = None  # 1-D mesh over all ranks (non-expert parameters)
    backend: Optional[str] = None  # "gloo" | "nccl" | None (single process)
    global_aux_loss: bool = False  # balancing loss from counts summed over all ranks
    a2a_overlap_chunks: int = 1  # parallel.a2a_overlap_chunks: expert all-to-all overlap (parallel/overlap.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _pick_device(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible: "
                             "launch at most one process per GPU on each node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _rendezvous(env: Mapping[str, str], rank: int, world: int, timeout_s: float):
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun, or "
                         "export MASTER_ADDR (host of rank 0) and MASTER_PORT (a free port) together with RANK, "
                         "WORLD_SIZE and LOCAL_RANK")
    try:
        port_i = int(port)
    except ValueError:
        raise ValueError(f"MASTER_PORT={port!r} must be an integer port") from None
    host = f"[{addr}]" if ":" in addr else addr
    where = f"MASTER_ADDR:MASTER_PORT={addr}:{port_i}"
    try:
        # tcp:// with an explicit rank/world (not env://) so only the values validated here are used; torch
        # reuses torchrun's agent store itself when TORCHELASTIC_USE_AGENT_STORE is set.
        store, _, _ = next(dist.rendezvous(f"tcp://{host}:{port_i}", rank=rank, world_size=world,
                                           timeout=timedelta(seconds=timeout_s)))
    except (RuntimeError, TimeoutError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        raise RendezvousError(
            f"rank {rank} of {world}: no rendezvous at {where} within {timeout_s:g} s "
            f"(parallel.rendezvous_timeout_s). Check that rank 0 was started, that {addr} is reachable from this "
            f"host and port {port_i} is open, and that every rank has the same MASTER_ADDR/MASTER_PORT and "
            f"WORLD_SIZE. Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return store


def _agree_on_start(store, rank: int, world: int, on_main: Callable[[], None], timeout_s: float) -> None:
    """Rank 0 runs ``on_main`` (takes the out_dir lock) after the rendezvous but before any process group; its
    outcome reaches the other ranks through the rendezvous store, so a refusal fails every rank at once with rank
    0's message (exit code 2 everywhere) instead of leaving them waiting in init_process_group until a timeout.
    The store (not a lock taken by every rank) because only rank 0's host can see its lock on a node-local out_dir."""
    key = f"moe_train/start/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # one decision per attempt
    if rank == 0:
        try:
            on_main()
        except BaseException as e:
            kind = "refused" if isinstance(e, ValueError) else "failed"
            store.set(key, f"{kind}\n{e}")
            try:  # rank 0 may host the store: stay until every rank has read the decision (or the timeout)
                store.wait([f"{key}/read/{r}" for r in range(1, world)], timedelta(seconds=timeout_s))
            except Exception:  # noqa: BLE001 - a rank that never came does not change rank 0's own error
                pass
            raise
        store.set(key, "ok\n")
        return
    try:
        decision, _, message = store.get(key).decode().partition("\n")  # waits up to the store's timeout
    except (RuntimeError, TimeoutError, OSError) as e:
        raise RendezvousError(f"rank {rank}: rank 0 did not say whether the run may start within {timeout_s:g} s "
                              f"(parallel.rendezvous_timeout_s); see rank 0's log. Cause: {type(e).__name__}") from e
    store.set(f"{key}/read/{rank}", "1")
    if decision == "refused":
        raise StartRefused(message)
    if decision != "ok":
        raise RuntimeError(f"rank {rank}: rank 0 failed before the run started: {message}")


def init_distributed(cfg: ParallelConfig, num_experts: int, *, env: Optional[Mapping[str, str]] = None,
                     on_main: Optional[Callable[[], None]] = None) -> ParallelContext:
    """Reads the launch environment, validates the layout, creates the process groups and the device mesh.

    ``on_main``: run by rank 0 before any process group exists (the out_dir lock); a ValueError it raises is raised
    on every rank (StartRefused on the others), see _agree_on_start."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    env = os.environ if env is None else env
    die_with_launcher(env)  # before anything slow: a worker whose launcher is gone must not train on
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    validate_layout(world, cfg.ep, num_experts)
    if cfg.world_size is not None and world != cfg.world_size:
        raise ValueError(f"WORLD_SIZE={world} but this config is written for parallel.world_size={cfg.world_size} "
                         f"ranks (dp {cfg.world_size // cfg.ep} x ep {cfg.ep}): launch {cfg.world_size} processes, "
                         f"add --miniature to try the layout on this machine, or --set parallel.world_size=null "
                         f"to run at another size")
    device, backend = _pick_device(local_rank)
    if world == 1:
        if on_main is not None:
            on_main()
        return ParallelContext(local_rank=local_rank, device=device, global_aux_loss=cfg.global_aux_loss)

    if dist.is_initialized():
        # Someone (a host framework) already made the default group: use it if it matches the environment.
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ValueError(f"a default process group already exists with rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, but the environment says RANK={rank} WORLD_SIZE={world}")
        backend = dist.get_backend()
        if on_main is not None:
            _agree_with_groups(rank, on_main)
    else:
        store = _rendezvous(env, rank, world, cfg.rendezvous_timeout_s)
        if on_main is not None:
            _agree_on_start(store, rank, world, on_main, cfg.rendezvous_timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.collective_timeout_s), **kwargs)
    ep = cfg.ep
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, device.type, mesh_dim_names=("world",))
    dp_idx, ep_idx = mesh.get_coordinate()
    assert rank == dp_idx * ep + ep_idx, (rank, dp_idx, ep_idx)  # ep groups are consecutive ranks
    return ParallelContext(
        world_size=world, rank=rank, local_rank=local_rank, dp_size=world, dp_rank=rank, ep_size=ep, ep_rank=ep_idx,
        device=device, mesh=mesh, ep_group=mesh.get_group("ep"), edp_group=mesh.get_group("dp"),
        edp_size=world // ep, edp_rank=dp_idx, world_mesh=world_mesh, backend=backend,
        global_aux_loss=cfg.global_aux_loss, a2a_overlap_chunks=cfg.a2a_overlap_chunks)


def destroy_distributed(ctx: ParallelContext, drain: bool = False) -> None:
    """Tears the process groups down (call once at the end of a run, on every rank). ``drain`` (a run that ended
    well on every rank): a barrier first, so no rank closes its connections while a peer may still be finishing its
    last collective over them (a gloo peer that loses its connection mid-operation aborts the process)."""
    if ctx.distributed and dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()


def _agree_with_groups(rank: int, on_main: Callable[[], None]) -> None:
    """_agree_on_start over existing process groups (a caller made them): rank 0's outcome broadcast to all."""
    outcome = [None]
    if rank == 0:
        try:
            on_main()
        except BaseException as e:
            outcome = [("refused" if isinstance(e, ValueError) else "failed", str(e))]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if rank != 0 and outcome[0] is not None:
        kind, message = outcome[0]
        raise StartRefused(message) if kind == "refused" else RuntimeError(f"rank 0 failed at start: {message}")


@contextmanager
def distributed(cfg: ParallelConfig, num_experts: int, ctx: Optional[ParallelContext] = None, *,
                exclusive: Optional[ContextManager] = None) -> Iterator[ParallelContext]:
    """The process groups of one run: ``ctx`` when the caller made them (the caller tears them down), else made from
    the launch environment here and torn down on exit, also when the run fails (a dead rank must not leave the
    others waiting in a collective of the next job in this process).

    ``exclusive``: a context manager rank 0 enters before the process groups exist and leaves after they are torn
    down (the out_dir lock, moe_train/io/lock.py); a ValueError on entering fails every rank with its message."""
    with ExitStack() as stack:
        on_main = (lambda: stack.enter_context(exclusive)) if exclusive is not None else None
        if ctx is not None:
            if on_main is not None:
                if ctx.distributed:
                    _agree_with_groups(ctx.rank, on_main)
                else:
                    on_main()
            yield ctx
            return
        ctx = init_distributed(cfg, num_experts, on_main=on_main)
        try:
            yield ctx
        except BaseException:
            destroy_distributed(ctx)  # no barrier: the other ranks may never reach one
            raise
        destroy_distributed(ctx, drain=True)


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()
