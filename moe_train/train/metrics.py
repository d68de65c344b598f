"""Per-step metrics: one JSON object per line in <out_dir>/metrics.jsonl, and a short console line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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
