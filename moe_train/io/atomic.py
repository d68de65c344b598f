"""Atomic writes: a crash at any point leaves either the old file / folder or the new one, never a half.

Every writer in moe_train goes through these primitives:

    write_file_atomically(path, write)   hidden temp file beside ``path``, fsync, os.replace  (model.pt, pointers)
    write_folder_atomically(dst, write)  hidden temp folder beside ``dst``, fsync, swap in      (Hugging Face export)
    staging_folder(dst) + commit_folder  the same in two steps, for collective writers whose ranks all write into
                                         the temp folder (resumable DCP checkpoints; staging_path names it)
    fsync_path(path)                     make a file's data or a directory's entries durable

The temp names start with "." so listings of complete files / folders skip them; a crash leaves only such a
hidden leftover, which the next write of the same target removes (staging_folder) or ignores (unique names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, Path]


def fsync_path(path: PathLike) -> None:
    """fsync a file (its data) or a directory (its entries: a rename is durable once its parent is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Runs ``write(f)`` on a temp file beside ``path``, fsyncs it and renames it over ``path``.

    Readers see the old file or the new one; on any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint should be as readable as any other file
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: PathLike, data: bytes) -> Path:
    return write_file_atomically(path, lambda f: f.write(data))


def staging_path(dst: PathLike) -> Path:
    """The fixed hidden name ``.{name}.tmp`` beside ``dst``: every rank of a collective save can compute it."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.tmp"


def staging_folder(dst: PathLike) -> Path:
    """staging_path(dst), emptied and created (a previous crash's leftovers are removed). One process calls it."""
    dst = Path(dst)
    tmp = staging_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_folder(tmp: PathLike, dst: PathLike) -> Path:
    """Makes the complete folder ``tmp`` durable and swaps it into place as ``dst``.

    An existing ``dst`` is first renamed to a hidden ``.{name}.old-*`` (restored if the second rename fails) and
    removed after, so ``dst`` always names a complete folder.
    """
    tmp, dst = Path(tmp), Path(dst)
    for f in tmp.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    fsync_path(dst.parent)
    return dst


def write_folder_atomically(dst: PathLike, write: Callable[[Path], None]) -> Path:
    """Runs ``write(tmp)`` into a fresh hidden folder beside ``dst``, then swaps it into place (commit_folder).

    A crash before the swap leaves ``dst`` untouched; on an error the temp folder is removed. Returns ``dst``
    as an absolute path.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"export path {str(dst)!r} exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        commit_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
