"""Resumable training checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data
position and RNG state; atomic, verified, pruned, loadable at another world size.

Layout under <out_dir>/checkpoints/:
    step_00000100/     __<rank>_<i>.distcp + .metadata   model and optimizer, each rank writes its own shards
                       trainer.pt                        step, scheduler, data position, counters (rank 0)
                       rng_rank<r>.pt                    each rank's torch RNG state
                       manifest.json                     written LAST: step, world/ep sizes, every file's size+sha256
    latest             the name of the newest complete checkpoint (replaced atomically)
Atomicity (io/atomic.py): everything is written into a hidden ``.step_X.tmp`` folder (staging_folder) and swapped
into place only when complete (commit_folder), then ``latest`` is replaced (write_bytes_atomically), so a crash
mid-save leaves the previous checkpoint as the latest; its hidden leftovers are removed when the next run starts
(remove_stale_temporaries). Retention (keep_last) prunes only steps before the one just saved
(prune_checkpoints). Verification: the manifest's sizes and checksums are
checked before loading; a mismatch raises CheckpointError naming the file and the other complete checkpoints.
Resharding: DCP stores each tensor with its global shape and the shards' offsets, so a checkpoint saved by N ranks
loads on M ranks; RNG states exist per saving rank and are reused only when the world size matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from moe_train.io.atomic import (
    DiskWriteError,
    commit_folder,
    disk_errors,
    remove_leftovers,
    staging_folder,
    staging_path,
    write_bytes_atomically,
)
from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.state import checkpoint_view

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted; the message says which and what else is available."""


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes the intent' to work in one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file())


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    done = complete_checkpoints(out_dir)
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        path = root / name
        if name.startswith("step_") and "/" not in name and path.is_dir():
            return path
        if done:  # an empty, torn or stale pointer: the newest complete checkpoint is the truth
            import logging

            logging.getLogger(__name__).warning(f"{pointer} names {name!r}, not a checkpoint here; using the newest "
                                                f"complete checkpoint {done[-1].name} instead")
    return done[-1] if done else None


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], ctx: ParallelContext, keep_last: int = 3,
                    trainable_only: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. A full disk or a read-only folder is
    DiskWriteError naming the folder (DCP wraps the OSError in a CheckpointException), its staging folder removed.
    ``trainable_only``: the model's frozen parameters are left out (Ada-K: the allocators, not the frozen base, which
    the resumed run rebuilds from train.init_from); load it with the same flag."""
    final = checkpoint_root(out_dir) / f"step_{step:08d}"
    try:
        with disk_errors(final):
            return _save_checkpoint(out_dir, step, model, optimizer, trainer_state, ctx, keep_last, trainable_only)
    except DiskWriteError:
        if ctx.is_main:
            shutil.rmtree(staging_path(final), ignore_errors=True)  # the space the half-written save took
        raise


def _save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     trainer_state: dict[str, Any], ctx: ParallelContext, keep_last: int,
                     trainable_only: bool = False) -> Path:
    root = checkpoint_root(out_dir)
    name = f"step_{step:08d}"
    final = root / name
    tmp = staging_path(final)  # .step_X.tmp, the same name on every rank
    if ctx.is_main:
        staging_folder(final)  # created empty: a previous crash's leftovers are removed
    _barrier(ctx)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    model_view, optim_view = checkpoint_view(model_sd, optim_sd, model, ctx)  # experts with their global shape
    with _quiet_single_process():
        dcp.save({"model": model_view, "optim": optim_view}, checkpoint_id=str(tmp))
    save_rng_state(tmp, ctx)
    if ctx.is_main:
        torch.save({"format": FORMAT, "step": step, **trainer_state}, tmp / "trainer.pt")
    _barrier(ctx)
    # each rank hashes the files it wrote; rank 0 writes the manifest last, then renames the folder into place
    mine = file_records(tmp, [p for p in sorted(tmp.iterdir())
                              if p.name.startswith(f"__{ctx.rank}_") or p.name == f"rng_rank{ctx.rank}.pt"
                              or (ctx.is_main and p.name in (".metadata", "trainer.pt"))])
    return commit_checkpoint(out_dir, tmp, final, step, mine, ctx, keep_last)


def file_records(folder: Path, files: list[Path]) -> dict[str, dict]:
    """Manifest entries (size, sha256) of ``files``, keyed by their path relative to ``folder``."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def commit_checkpoint(out_dir: str | Path, tmp: Path, final: Path, step: int, mine: dict[str, dict],
                      ctx: ParallelContext, keep_last: int) -> Path:
    """Collective, after every rank wrote its files into the staging folder ``tmp``: the manifest of every rank's
    ``mine`` (file_records), written last by rank 0, the folder renamed into place, ``latest`` updated, retention."""
    root, name = checkpoint_root(out_dir), final.name
    gathered = [None] * ctx.world_size if ctx.distributed else [mine]
    if ctx.distributed:
        dist.all_gather_object(gathered, mine)
    if ctx.is_main:
        files = {k: v for part in gathered for k, v in part.items()}
        manifest = {"format": FORMAT, "step": step, "world_size": ctx.world_size, "ep_size": ctx.ep_size,
                    "files": files}
        write_bytes_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        commit_folder(tmp, final)
        write_bytes_atomically(root / "latest", name.encode())
        prune_checkpoints(out_dir, final, keep_last)
    _barrier(ctx)
    return final


def prune_checkpoints(out_dir: str | Path, newest: Path, keep_last: int) -> None:
    """Retention after ``newest`` was committed: it and the keep_last - 1 checkpoints before it stay. Only older
    steps go: a run resumed from an earlier checkpoint (train.resume_from, e.g. back before a divergence) sorts
    below the abandoned trajectory's later steps, and pruning by name alone would delete the checkpoint it just
    wrote; the later ones are left to the user."""
    if keep_last <= 0:
        return
    older = [p for p in complete_checkpoints(out_dir) if p.name < newest.name]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        assert old != newest
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """The hidden staging folders (``.step_X.tmp``), swapped-out old folders (``.step_X.old-*``) and pointer temp
    files (``.latest.*.tmp``) that a crash or a full disk left in <out_dir>/checkpoints. Rank 0 of the run that
    owns out_dir, before its first save; never a complete checkpoint or a user's file."""
    return remove_leftovers(checkpoint_root(out_dir), r"step_\d{8}|latest")


def verify_checkpoint(path: Path) -> dict:
    """The manifest, after checking that every listed file exists with its size and checksum."""
    others = ", ".join(p.name for p in complete_checkpoints(path.parent.parent) if p != path) or "none"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {MANIFEST}: the save never finished); "
                              f"other complete checkpoints: {others}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {MANIFEST} is corrupted ({e}); other complete "
                              f"checkpoints: {others}") from e
    for fname, meta in manifest["files"].items():
        f = path / fname
        if not f.is_file() or f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: {fname} is missing or differs from its "
                                  f"recorded size/checksum; resume from another one (train.resume_from) — "
                                  f"complete checkpoints: {others}")
    return manifest


def _options(trainable_only: bool) -> StateDictOptions:
    # frozen parameters left out of a trainable_only checkpoint; DCP's load still fails on a missing trainable key
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ctx: ParallelContext, trainable_only: bool = False) -> dict:
    """Collective. Loads model + optimizer shards (any world size), RNG state (same world size only); returns the
    trainer state (step, scheduler, data position, counters). ``trainable_only``: as save_checkpoint's."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    manifest = verify_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    model_view, optim_view = checkpoint_view(model_sd, optim_sd, model, ctx)  # aliases: loads in place
    with _quiet_single_process():
        dcp.load({"model": model_view, "optim": optim_view}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(trainable_only))
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if manifest["world_size"] == ctx.world_size:
        restore_rng_state(path, ctx)
    return trainer_state


def save_rng_state(folder: Path, ctx: ParallelContext) -> None:
    """This rank's torch RNG state (CPU, and CUDA when on a GPU) as folder/rng_rank<r>.pt."""
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None},
               folder / f"rng_rank{ctx.rank}.pt")


def restore_rng_state(folder: Path, ctx: ParallelContext) -> None:
    """The RNG state save_rng_state wrote for this rank (the saving world size must be this one)."""
    rng = torch.load(folder / f"rng_rank{ctx.rank}.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
