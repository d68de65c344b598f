"""Every Triton kernel of moe_train.kernels compiled ahead of time for sm_90 (H100 / H200) and sm_100 (B200) with
triton's bundled ptxas, no GPU needed: zero register spills at every shape of moe_train.kernels.aot_report (routing
N up to LongCat-Flash's 768 scored experts, K up to 12; permutation E up to 768; rows D up to 7168; bf16 and fp32),
with the block sizes and num_warps the launch wrappers choose (route_config, build_config, row_config).

One subprocess compiles everything (~1-2 min on 2 busy cores): it must run without TRITON_INTERPRET, which
conftest.py sets for this process before triton is imported.
Shape legend: N scored experts, E experts, K picks per token, D hidden.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # nothing written to ~/.triton
    proc = subprocess.run([sys.executable, "-m", "moe_train.kernels.aot_report"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    if "skip" in out:  # this triton has no NVIDIA backend or no bundled ptxas
        pytest.skip(out["skip"])
    return out


def _summary(rows) -> str:
    """Most registers and spill bytes per (kernel, arch), for the log and the failure message."""
    worst = collections.defaultdict(lambda: [0, 0, 0])
    for r in rows:
        w = worst[(r["fn"], r["arch"])]
        w[0], w[1], w[2] = max(w[0], r["regs"]), w[1] + r["spill_stores"], w[2] + r["spill_loads"]
    return "\n".join(f"{fn} {arch}: max {w[0]} registers, spill stores {w[1]} B, loads {w[2]} B (all shapes)"
                     for (fn, arch), w in sorted(worst.items()))


def test_every_kernel_compiles_spill_free_for_sm90_and_sm100(aot):
    rows = aot["rows"]
    print(f"\naot_report: {len(rows)} launches in {aot['seconds']} s\n{_summary(rows)}")
    assert {r["fn"] for r in rows} == set(aot["kernels"])  # every kernel of both modules was compiled
    assert {r["arch"] for r in rows} == {"sm_90", "sm_100"}
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "ptxas spills:\n" + "\n".join(map(str, spilled[:20])) + "\n" + _summary(rows)
    assert all(0 < r["regs"] <= 255 for r in rows)


def test_report_covers_the_listed_shapes(aot):
    """LongCat-Flash's routing (N 768, K 12) and its hidden size (7168) at K 12, both dtypes, both archs."""
    rows = aot["rows"]
    route = {(r["N"], r["K"], r["dtype"], r["arch"]) for r in rows if r["kernel"] == "route"}
    for N in (8, 64, 128, 160, 256, 768):
        assert any(n == N for n, *_ in route), N
    assert {(768, 12, d, a) for d in ("bfloat16", "float32") for a in ("sm_90", "sm_100")} <= route
    rows_D = {(r["D"], r["K"], r["dtype"]) for r in rows if r["kernel"] == "rows"}
    assert {(D, 12, d) for D in (4096, 5120, 7168) for d in ("bfloat16", "float32")} <= rows_D
    assert max(r["E"] for r in rows if r["kernel"] == "build") == 768
