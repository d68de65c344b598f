"""What a run reports: one JSON object per step in <out_dir>/metrics.jsonl, TensorBoard scalars, and the human
progress lines on the ``moe_train.train`` logger (the CLI sends them to stdout; a library caller configures
logging as it likes)."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from moe_train.io.atomic import write_bytes_atomically


def _main_rank_only(record: logging.LogRecord) -> bool:
    """N ranks, one log: only the process of global rank 0 (or a process without a process group) emits."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# One logger for the trainer and Ada-K, filtered at the logger itself so every handler sees rank 0 only.
logger = logging.getLogger("moe_train.train")
logger.addFilter(_main_rank_only)


def configure_logging() -> None:
    """The command line's set-up (also for ranks that --miniature spawns, which start with Python's defaults):
    messages on stderr; the training progress (this logger, rank 0 only) on stdout, where the train and adak jobs
    have always printed it, as eval prints its results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stdout))
        logger.propagate = False


def read_records(path: Path) -> list[tuple[bytes, dict]]:
    """The records of a metrics.jsonl (each with its line), tolerantly: a line that is not a JSON object (the torn
    last line a full disk or a kill mid-write leaves, e.g. ``{"step": 5, "lo`` without its newline) is dropped
    with a warning naming the file and line, so it never blocks a resume; metrics are a log, not training state."""
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            record = None
        if not isinstance(record, dict):
            logger.warning(f"{path}: line {number} is not a complete JSON record (a torn write?); dropped: "
                           f"{line[:80]!r}")
            continue
        records.append((line, record))
    return records


class MetricsWriter:
    """``resume_step``: keep the records up to that step (a resumed run continues the file; records a crashed
    run wrote after its last checkpoint are dropped, they will be written again). ``keep``: instead, the records a
    resumed run keeps (Ada-K numbers the steps of each of its two stages from 1: train/adak.py).

    Each record is appended with one os.write of the whole line on an O_APPEND descriptor (no buffering across
    records), so a kill or a full disk can tear at most the last line, which the next resume drops."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0,
                 keep: Optional[Callable[[dict], bool]] = None):
        self.path: Optional[Path] = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(out_dir) / "metrics.jsonl"
            kept = []
            if keep is not None and self.path.is_file():
                kept = [line for line, r in read_records(self.path) if keep(r)]
            elif resume_step and self.path.is_file():
                # the end-of-run validation line (val_* figures, no training loss) describes a model the resumed
                # run moves on from; a step's own record keeps its periodic validation (train.eval_every)
                kept = [line for line, r in read_records(self.path)
                        if r.get("step", 0) <= resume_step and not ("val_loss" in r and "loss" not in r)]
            # atomically: a crash here must not lose the records of the steps the resumed run keeps
            write_bytes_atomically(self.path, b"".join(line + b"\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):  # a regular file writes short only when out of space
            raise OSError(errno.ENOSPC, f"metrics record torn after {written} of {len(data)} bytes (disk full?)",
                          str(self.path))


# TensorBoard groups (the part of a tag before "/"): validation (val_* keys), routing (experts per token, FLOPs vs
# top-k, balance, drops, router losses), system (speed, memory), the rest under train/ (loss, lr, grad norm).
ROUTING_KEYS = ("true_experts", "flops_vs_topk", "expert_flops", "drop_rate", "expert_imbalance", "rank_imbalance",
                "aux_loss", "z_loss", "entropy_loss", "null_bias", "mean_k", "k_", "budget", "capacity")
SYSTEM_KEYS = ("tokens_per_s", "tflops", "mfu", "peak_memory", "memory", "seconds", "step_time", "bad_steps")


def tensorboard_tag(key: str) -> str:
    """The grouped tag of a metrics.jsonl key: val_loss -> val/loss, true_experts_per_token ->
    routing/true_experts_per_token, tokens_per_s -> system/tokens_per_s, loss -> train/loss."""
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("validation/"):
        return f"val/{key[len('validation/'):]}"
    if any(key.startswith(k) for k in ROUTING_KEYS):
        return f"routing/{key}"
    if any(key.startswith(k) for k in SYSTEM_KEYS):
        return f"system/{key}"
    return f"train/{key}"


def tensorboard_scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) of every number in a record: a list is one scalar per layer (``<key>/layer_<i>``), a dict one
    per name (``<key>/<name>``); strings and the step are left out."""
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            out.append((tensorboard_tag(name), value))
        elif isinstance(value, list):
            out += [(f"{tensorboard_tag(name)}/layer_{i}", v) for i, v in enumerate(value)
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        elif isinstance(value, dict):
            if key == "validation" and not prefix:
                out += tensorboard_scalars({k if k.startswith("val_") else f"val_{k}": v for k, v in value.items()})
            else:
                out += [(f"{tensorboard_tag(name)}/{k}", v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return out


class TensorBoard:
    """Numeric metrics as TensorBoard scalars under <out_dir>/tb; a no-op when disabled or not installed."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed: no event files (pip install tensorboard, or "
                           "train.tensorboard: false)")
            return
        self.writer = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict, step: int) -> None:
        """Every number of ``record`` (lists per layer and dicts per label included) under its group's tag."""
        if self.writer is not None:
            for tag, value in tensorboard_scalars(record):
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
