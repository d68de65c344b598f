"""The readable form of `moe-train eval`'s results (its default output; ``--json`` prints the JSON lines instead):
one row per variant and task, the figures that compare models side by side, then generations and lm-eval metrics.

    result                          acc    acc_norm  ppl      val_loss  experts/tok  flops/topk
    adak:tests/data/synthetic_mc    0.625  0.600     -        -         1.31         0.82
    top2:tests/data/synthetic_mc    0.650  0.625     -        -         2.00         1.00
"""

from __future__ import annotations

import json
import math
from typing import Any

# (column title, report key, format)
COLUMNS = (("acc", "acc", "{:.3f}"), ("acc_norm", "acc_norm", "{:.3f}"), ("ppl", "perplexity", "{:.3f}"),
           ("val_loss", "val_loss", "{:.4f}"), ("experts/tok", "mean_k", "{:.3f}"),
           ("hard/easy k", None, None), ("flops/topk", "flops_vs_topk", "{:.3f}"))


def _cell(rep: dict, key: str | None, fmt: str | None) -> str:
    if key is None:  # mean k of the hard / easy label groups (--difficulty)
        hard, easy = rep.get("mean_k_hard"), rep.get("mean_k_easy")
        return f"{hard:.2f}/{easy:.2f}" if isinstance(hard, float) and isinstance(easy, float) else "-"
    value = rep.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return fmt.format(value)
    return "-"


def format_results(results: dict[str, Any]) -> str:
    """A table of ``run_eval``'s results (keys "<variant>:<what>"), then generations and lm-eval results."""
    header = [f"checkpoint {results.get('checkpoint')} (router {results.get('router')})"]
    if isinstance(results.get("baseline"), dict):
        b = results["baseline"]
        header.append(f"baseline   {b.get('checkpoint')} (router {b.get('router')})")
    rows, extra = [], []
    for name, rep in results.items():
        if ":" not in name or not isinstance(rep, dict):
            continue
        if "completion" in rep:
            ks = [sum(k) / len(k) if isinstance(k, list) and k else k for k in rep.get("k_per_token", [])]
            extra.append(f"{name}: {rep['prompt']!r} -> {rep['completion']!r} (mean true experts per new token "
                         f"{' '.join(f'{k:.2f}' for k in ks[:16] if isinstance(k, (int, float)))})")
        elif name.endswith(":lm_eval"):
            extra.append(f"{name}: {json.dumps(rep, default=str)[:400]}")
        else:
            rows.append([name] + [_cell(rep, key, fmt) for _, key, fmt in COLUMNS])
    lines = header
    if rows:
        used = [i for i in range(len(COLUMNS)) if any(r[i + 1] != "-" for r in rows)]
        table = [["result"] + [COLUMNS[i][0] for i in used]] + [[r[0]] + [r[i + 1] for i in used] for r in rows]
        widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
        lines += ["", *("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines)
