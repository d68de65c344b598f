"""The machine a benchmark ran on, for its first JSON line: CPU model, the vector / matrix flags that decide how fast
fp32 and bf16 GEMMs can be (AVX2, AVX-512, AVX-512 BF16, AMX), torch's CPU capability, threads and load average.
Also: round-robin timing with median and spread, shared by the benchmarks of issue 14."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_env() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16_fast = bool({"amx_bf16", "avx512_bf16"} & flags)
    return {"cpu": model, "cpu_flags": {f: f in flags for f in FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "bf16_matrix_units": bf16_fast,
            "note": None if bf16_fast else "no AVX-512 BF16 / AMX: bf16 GEMMs are emulated and slow on this CPU"}


def round_robin(fns: dict, reps: int, warmup: int = 2, sync=None) -> dict:
    """Times every fn once per round (A B C, A B C, ...) so that load changes hit all alike. Returns per name
    {median_s, min_s, max_s, iqr_s, times_s}; the paired ratios use the per-round times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[n] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "iqr_s": q[2] - q[0],
                  "times_s": ts}
    return out


def paired_ratio(res: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) in the same round (steadier than a ratio of medians under load)."""
    return statistics.median(x / y for x, y in zip(res[a]["times_s"], res[b]["times_s"]))
