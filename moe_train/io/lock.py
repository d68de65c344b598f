"""One writer per out_dir: an exclusive lock that rank 0 holds for the whole job.

Two runs on one out_dir would adopt each other's checkpoints, interleave metrics.jsonl and replace each other's
final model, so the second one must fail before any work. The lock is ``fcntl.flock`` on ``<out_dir>/.lock``; the
file also holds a record of the holder (host, pid, the pid's start time from /proc/<pid>/stat, the boot id and the
date the lock was taken) so that a refusal names the holder, and so that a lock that outlived its holder is told
apart from a live one:

    flock free, no record                fresh: take it
    flock free, record left behind       the holder died without releasing (kill -9, power loss, node crash; the
                                         kernel drops a flock with its last open descriptor): stale, taken over
                                         with a warning naming the old holder. The one exception: the record names
                                         a live process on this host (same pid, same start time, same boot) -- the
                                         filesystem does not honour flock (some FUSE / NFS local_lock mounts), so
                                         the record is all there is: refused.
    flock held                           a live run holds it: refused (OutDirLocked, exit code 2), naming it.

A pid whose start time differs from the record's is another process that reused the number (stale). The file is
never unlinked: unlinking a lock file lets a third process lock a fresh inode while a second still waits on the
old one. Released (record cleared, then flock dropped) when the job ends; a crash releases the flock anyway.
Across hosts flock works where the filesystem propagates it (NFSv4, Lustre with flock, GPFS); on one that keeps
locks per host a run on another host is trusted to be gone once its lock is free (a requeued Slurm job lands on
another node), and the take-over warning names the old holder.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class OutDirLocked(ValueError):
    """Another live run holds this out_dir (a user mistake: two jobs pointed at one folder)."""


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None when it does not
    exist (or there is no /proc). With the pid it names one process: a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may hold spaces or ')': the fields after it start past the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _alive_here(record: dict) -> bool:
    """Whether the recorded holder (on this host) is still the same running process."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
        return False  # the machine rebooted since: pids and start times start over
    start = process_start_time(pid)
    if start is not None:
        return start == record.get("start_time")
    if Path("/proc/self/stat").exists():
        return False  # /proc works and has no such pid
    try:  # no /proc (not Linux): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(record: dict) -> str:
    if not record:
        return "an unknown process (its record is empty or unreadable)"
    return (f"pid {record.get('pid')} on host {record.get('host')!r} (since {record.get('since')}"
            f"{', job ' + str(record['job']) if record.get('job') else ''})")


class OutDirLock:
    """``with OutDirLock(out_dir):`` holds the lock for the block; ``acquire`` / ``release`` for longer spans.

    Raises OutDirLocked when a live run holds the folder, ValueError when the lock file cannot be created."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: Optional[int] = None
        self.record: dict = {}

    def _read_record(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):  # torn by a crash mid-write: no usable record
            return {}

    def _refuse(self, holder: dict) -> OutDirLocked:
        return OutDirLocked(
            f"train.out_dir={str(self.out_dir)!r} is in use by another run: {describe_holder(holder)} holds "
            f"{self.path}. Two runs on one out_dir would mix their checkpoints, metrics and final model. Wait for "
            f"that run to end (or stop it: kill {holder.get('pid', '<pid>')} on {holder.get('host', 'its host')}), "
            f"or give this run another train.out_dir")

    def acquire(self) -> "OutDirLock":
        assert self.fd is None, "lock already held by this object"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ValueError(f"train.out_dir={str(self.out_dir)!r}: cannot create the lock file {self.path} "
                             f"({e.strerror}); out_dir must be a writable folder") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ValueError(f"train.out_dir={str(self.out_dir)!r}: cannot lock {self.path} ({e.strerror})"
                                     ) from None
                raise self._refuse(self._read_record(fd)) from None
            old = self._read_record(fd)
            if old:
                if old.get("host") == socket.gethostname() and _alive_here(old):
                    raise self._refuse(old)  # flock not honoured here, but the recorded holder runs
                log.warning(f"out_dir {str(self.out_dir)!r}: taking over a stale lock left by "
                            f"{describe_holder(old)}: that process is gone (killed or crashed without releasing it)")
            self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                           "start_time": process_start_time(os.getpid()), "boot_id": _boot_id(),
                           "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")}
            data = json.dumps(self.record).encode() + b"\n"
            # in place (never a rename: the lock lives on this inode); a reader meanwhile sees a torn record at worst
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # drops the flock if it was taken
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # cleared before the flock drops: an empty record means a clean release
        except OSError as e:  # a full or vanished disk must not hide the run's own outcome
            log.warning(f"could not clear the lock record {self.path}: {e}")
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
