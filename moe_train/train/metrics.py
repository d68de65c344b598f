"""What a run reports: one JSON object per step in <out_dir>/metrics.jsonl, TensorBoard scalars, and the human
progress lines on the ``moe_train.train`` logger (the CLI sends them to stdout; a library caller configures
logging as it likes)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist


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


class MetricsWriter:
    """``resume_step``: keep the records up to that step (a resumed run continues the file; records a crashed
    run wrote after its last checkpoint are dropped, they will be written again)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.path: Optional[Path] = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(out_dir) / "metrics.jsonl"
            kept = []
            if resume_step and self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step
                        and "val_loss" not in json.loads(line)]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
