"""Atomic writes: a crash at any point leaves either the old file / folder or the new one, never a half.

Every writer in moe_train goes through these primitives:

    write_file_atomically(path, write)   hidden temp file beside ``path``, fsync, os.replace  (model.pt, pointers)
    write_folder_atomically(dst, write)  hidden temp folder beside ``dst``, fsync, swap in      (Hugging Face export)
    staging_folder(dst) + commit_folder  the same in two steps, for collective writers whose ranks all write into
                                         the temp folder (resumable DCP checkpoints; staging_path names it)
    fsync_path(path)                     make a file's data or a directory's entries durable
    remove_leftovers(folder, names)      the hidden temp files / folders a crash or a full disk left in ``folder``

The temp names start with "." so listings of complete files / folders skip them; a crash leaves only such a
hidden leftover, which the next write of the same target removes (staging_folder) or ignores (unique names), and
remove_leftovers deletes at the next start of the writer that owns the folder.
Files and folders are created as open() / mkdir() would (0o666 / 0o777 less the process umask): a shared
cluster's group can read checkpoints, models and exports unless the user's umask says otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
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


def write_file_atomically(path: PathLike, write: Callable[[BinaryIO], None], by_name: bool = False) -> Path:
    """Runs ``write(f)`` on a temp file beside ``path``, fsyncs it and renames it over ``path``. ``by_name``:
    ``write(temp_path)`` instead, for writers that open the file themselves (a streamed model.pt).

    Readers see the old file or the new one; on any error the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path)
    try:
        if by_name:
            os.close(fd)
            write(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new hidden ``.{name}.<8 hex>.tmp`` beside ``path``, created as ``open()`` would (0o666 less the process
    umask; mkstemp's 0600 hid checkpoints and models from the rest of the group on a shared cluster)."""
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # a leftover of the same name (unlikely): draw another
            continue


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
    # mode 0o777 less the umask, as mkdir(1) makes it; mkdtemp's 0700 hid exports from the rest of the group
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _modes_like_open(tmp)
        commit_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only swap it, and a file
    another thread creates meanwhile would get the swapped-in mask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _modes_like_open(folder: Path) -> None:
    """Gives every file / folder under ``folder`` the mode open() / mkdir() would (0o666 / 0o777 less the umask):
    some writers create private files whatever the umask (safetensors' save_file makes 0600), which would hide an
    export from the rest of the group; copies of the user's files (tokenizer) are new files here too."""
    mask = process_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _leftover_name(names: str) -> re.Pattern:
    """The hidden temp names of this module's writers for a target whose name matches the regex ``names``:
    ``.N.tmp`` (staging_path), ``.N.<8>.tmp`` (write_file_atomically; mkstemp's names before it), ``.N.tmp-<8>``
    (write_folder_atomically; mkdtemp's), ``.N.old-<8 hex>`` (commit_folder)."""
    return re.compile(rf"\.(?:{names})(?:\.tmp|\.[a-z0-9_]{{8}}\.tmp|\.tmp-[a-z0-9_]{{8}}|\.old-[0-9a-f]{{8}})")


def remove_leftovers(folder: PathLike, names: str) -> list[Path]:
    """Removes from ``folder`` (not below it) the hidden temp files / folders that a crash or a full disk left
    behind writes of targets named like the regex ``names`` (e.g. ``r"step_\\d{8}|latest"``); nothing else,
    never a user's file. Only the folder's single writer may call it (a live write's temp would go too). Returns
    what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = _leftover_name(names)
    removed = []
    for entry in sorted(folder.iterdir()):
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)  # a symlink itself, never what it points to
        removed.append(entry)
    return removed
