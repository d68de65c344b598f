"""Atomic writes: a crash at any point leaves either the old file / folder or the new one, never a half.

Every writer in moe_train goes through these primitives:

    write_file_atomically(path, write)   hidden temp file beside ``path``, fsync, os.replace  (model.pt, pointers)
    write_folder_atomically(dst, write)  hidden temp folder beside ``dst``, fsync, swap in      (Hugging Face export)
    staging_folder(dst) + commit_folder  the same in two steps, for collective writers whose ranks all write into
                                         the temp folder (resumable DCP checkpoints; staging_path names it)
    fsync_path(path)                     make a file's data or a directory's entries durable
    remove_leftovers(folder, names)      the hidden temp files / folders a crash or a full disk left in ``folder``
    disk_errors(path)                    a full disk / read-only filesystem / denied permission met inside the block
                                         (an OSError, or a library's error that wraps one: DCP's CheckpointException,
                                         safetensors' "os error 28") as DiskWriteError: one line naming the path

The temp names start with "." so listings of complete files / folders skip them; a crash leaves only such a
hidden leftover, which the next write of the same target removes (staging_folder) or ignores (unique names), and
remove_leftovers deletes at the next start of the writer that owns the folder.
Files and folders are created as open() / mkdir() would (0o666 / 0o777 less the process umask): a shared
cluster's group can read checkpoints, models and exports unless the user's umask says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

PathLike = Union[str, Path]

# errno -> (what happened, what to do); only what the user fixes on the machine, not a bug of ours
DISK_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "free space on that filesystem or choose another output folder"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or choose another output folder"),
    errno.EROFS: ("read-only file system", "choose an output folder on a writable filesystem"),
    errno.EACCES: ("permission denied", "choose an output folder this user can write, or fix its permissions"),
}
# the same faults as Rust / C libraries word them inside their own exception types (safetensors: "os error 28")
_DISK_TEXT = {errno.ENOSPC: ("os error 28", "no space left on device"), errno.EDQUOT: ("os error 122",),
              errno.EROFS: ("os error 30", "read-only file system"), errno.EACCES: ("os error 13",)}


class DiskWriteError(ValueError):
    """A write failed on the machine's side (full disk, read-only filesystem, no permission): one line with the
    path and the fix. A ValueError: the command line prints it without a traceback (exit 2)."""

    def __init__(self, path: PathLike, code: int):
        what, fix = DISK_ERRNOS[code]
        self.path, self.errno = Path(path), code
        super().__init__(f"cannot write {str(path)!r}: {what} ({errno.errorcode[code]}); nothing was half-written "
                         f"(an earlier file or folder there is intact): {fix}")


def disk_errno(exc: BaseException) -> Optional[int]:
    """The DISK_ERRNOS errno behind ``exc``: an OSError in its cause / context chain, in DCP's per-rank failures
    (CheckpointException.failures: rank -> (exception, traceback)), or named in a library's message."""
    stack, seen = [exc], set()
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return x.errno
        text = str(x).lower()
        for code, needles in _DISK_TEXT.items():
            if any(n in text for n in needles):
                return code
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                stack += list(f) if isinstance(f, tuple) else [f]
    return None


def check_writable(path: PathLike, what: str) -> None:
    """A writer's output ``path`` can be made: its nearest existing folder is writable (os.access also reports a
    read-only filesystem). ValueError naming ``what`` (the option or key) otherwise, before any work."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be written: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be written: {str(probe)!r} is not writable (a read-only "
                         f"filesystem or permissions); choose a writable output folder")


@contextlib.contextmanager
def disk_errors(path: PathLike) -> Iterator[None]:
    """Turns a full disk / read-only filesystem / denied permission met in the block into DiskWriteError naming
    ``path``; any other error passes unchanged (the writers' own cleanup has run by then)."""
    try:
        yield
    except DiskWriteError:
        raise
    except Exception as e:
        code = disk_errno(e)
        if code is None:
            raise
        raise DiskWriteError(path, code) from e


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
    with disk_errors(path):
        return _write_file_atomically(path, write, by_name)


def _write_file_atomically(path: Path, write: Callable, by_name: bool) -> Path:
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
    with disk_errors(dst):
        return _write_folder_atomically(dst, write)


def _write_folder_atomically(dst: Path, write: Callable[[Path], None]) -> Path:
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
