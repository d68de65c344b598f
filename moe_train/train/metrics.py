"""Per-step metrics: one JSON object per line in <out_dir>/metrics.jsonl, and a short console line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsWriter:
    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.path: Optional[Path] = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(out_dir) / "metrics.jsonl"
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
