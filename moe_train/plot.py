"""`moe-train plot`: pictures that compare runs, read from each run's ``metrics.jsonl``.

    moe-train plot runs/tiny_top2 runs/tiny_adamoe              # PNGs in runs/tiny_top2/plots/
    moe-train plot runs/tiny_adamoe --out docs/img --only overview

One PNG per figure (FIGURES), each with one line per run:
    loss                training loss per step, validation loss (val_loss) as markers
    experts_per_layer   true experts per token, one panel per MoE layer (true_experts_per_layer)
    flops_vs_topk       forward FLOPs against the top-k baseline (flops_vs_topk)
    tokens_per_s        throughput (tokens_per_s)
    memory              peak accelerator / process memory (peak_memory_mb)
    overview            the five above on one page
A figure whose metric no run recorded is skipped. matplotlib is optional (the ``bench`` extra); without it the job
stops with a ValueError saying how to install it. Library code: it logs, the command line prints the files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

FIGURES = ("loss", "experts_per_layer", "flops_vs_topk", "tokens_per_s", "memory", "overview")
_SCALARS = {  # figure -> (metric key, y label)
    "flops_vs_topk": ("flops_vs_topk", "forward FLOPs / top-k baseline"),
    "tokens_per_s": ("tokens_per_s", "tokens / s"),
    "memory": ("peak_memory_mb", "peak memory (MB)"),
}


class Run:
    """One run's metrics: training records (with ``loss``) and validation records (with ``val_loss``)."""

    def __init__(self, folder: Path, label: str):
        self.folder, self.label = folder, label
        self.train: list[dict] = []
        self.val: list[dict] = []
        path = folder / "metrics.jsonl"
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s: line %d is not JSON (a torn last line?); skipped", path, number)
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if "loss" in rec:
                self.train.append(rec)
            if "val_loss" in rec:
                self.val.append(rec)

    def series(self, key: str, records: Optional[list[dict]] = None) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for r in self.train if records is None else records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return steps, values


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    """The runs to compare; a folder without metrics.jsonl (or the file itself given) is a ValueError."""
    paths = []
    for f in folders:
        p = Path(f)
        if p.is_file() and p.name == "metrics.jsonl":
            p = p.parent
        if not (p / "metrics.jsonl").is_file():
            raise ValueError(f"{str(f)!r} holds no metrics.jsonl: give a run folder (train.out_dir) of "
                             f"`moe-train train` or `moe-train adak`")
        paths.append(p)
    names = [p.resolve().name for p in paths]
    labels = [p.resolve().name if names.count(p.resolve().name) == 1 else str(p) for p in paths]
    runs = [Run(p, label) for p, label in zip(paths, labels)]
    if not any(r.train or r.val for r in runs):
        raise ValueError(f"no step records in {', '.join(str(p / 'metrics.jsonl') for p in paths)}: nothing to plot")
    return runs


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("moe-train plot needs matplotlib, which is not installed: pip install 'matplotlib>=3.5,<4' "
                         "(or pip install -e '.[bench]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _draw_loss(ax, runs: list[Run]) -> bool:
    drawn = False
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps, loss = run.series("loss")
        if steps:
            ax.plot(steps, loss, color=color, lw=1, label=f"{run.label} train")
            drawn = True
        vsteps, vloss = run.series("val_loss", run.val)
        if vsteps:
            ax.plot(vsteps, vloss, color=color, marker="o", ls="--", ms=4, label=f"{run.label} val")
            drawn = True
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    return drawn


def _draw_layers(ax, runs: list[Run]) -> bool:
    drawn = False
    styles = ("-", "--", ":", "-.")
    for i, run in enumerate(runs):
        rows = [(r["step"], r["true_experts_per_layer"]) for r in run.train
                if isinstance(r.get("true_experts_per_layer"), list)]
        if not rows:
            continue
        layers = len(rows[0][1])
        for l in range(layers):
            pts = [(s, v[l]) for s, v in rows if len(v) > l]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", ls=styles[l % len(styles)], lw=1,
                    label=f"{run.label} layer {l}" if layers <= 8 or l in (0, layers - 1) else None)
        drawn = True
    ax.set_title("true experts per token, per layer")
    ax.set_xlabel("step")
    ax.set_ylabel("true experts / token")
    return drawn


def _draw_scalar(ax, runs: list[Run], key: str, ylabel: str) -> bool:
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series(key)
        if steps:
            ax.plot(steps, values, color=f"C{i}", lw=1, label=run.label)
            drawn = True
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    return drawn


def _draw(ax, name: str, runs: list[Run]) -> bool:
    if name == "loss":
        drawn = _draw_loss(ax, runs)
    elif name == "experts_per_layer":
        drawn = _draw_layers(ax, runs)
    else:
        drawn = _draw_scalar(ax, runs, *_SCALARS[name])
    if drawn:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return drawn


def plot_runs(folders: Sequence[str | Path], out: Optional[str | Path] = None,
              only: Optional[Sequence[str]] = None, dpi: int = 80) -> list[Path]:
    """Writes the PNGs comparing ``folders`` into ``out`` (default: <first run>/plots); returns the files."""
    names = list(FIGURES if not only else only)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: unknown figure; choose from {', '.join(FIGURES)}")
    runs = load_runs(folders)
    plt = _matplotlib()
    out_dir = Path(out) if out is not None else runs[0].folder / "plots"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; give a folder (made if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        if name == "overview":
            panels = [n for n in FIGURES if n != "overview"]
            fig, axes = plt.subplots(2, 3, figsize=(15, 8))
            drawn = [_draw(ax, n, runs) for ax, n in zip(axes.flat, panels)]
            for ax, ok in zip(axes.flat, drawn + [False]):
                if not ok:
                    ax.set_visible(False)
            title = " vs ".join(r.label for r in runs)
            fig.suptitle(title if len(title) < 100 else f"{len(runs)} runs")
        else:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = [_draw(ax, name, runs)]
        if not any(drawn):
            plt.close(fig)
            log.info("plot: no run recorded what %s shows; skipped", name)
            continue
        fig.tight_layout()
        path = out_dir / f"run_{name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written
