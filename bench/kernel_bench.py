"""Kernel benchmarks: permutation throughput and grouped GEMM rate, each beside a baseline measured in the same run.
Prints one JSON object per line.

    python bench/kernel_bench.py [--only permute|gemm] [--quick] [--reps 5] [--cpu-gemm-rows 256]

permute lines (one per shape and op): GB/s of every implementation on the same logical bytes
    permute:           N rows read + N rows written          (N = true assignments = T*k*(1-null_frac))
    unpermute_combine: N rows read + T rows written
  impls: torch = moe_train.kernels.permute with backend torch (what CPU runs); index_select / index_add_ = the bare
  torch op (no weights); triton = the Triton kernels (CUDA only); memcpy = a device copy of the same byte count.
  vs_memcpy = GB/s / memcpy GB/s (goal: >= 0.5, i.e. within 2x of a copy). build_ms: build_permutation time.
gemm lines: grouped GEMM x[N, D] @ w[E, D, F] at Mixtral-8x7B (D=4096, F=14336) and 8x22B (D=6144, F=16384) expert
  shapes, E=8, forward and forward+backward, against a dense x[N, D] @ w[D, F] of the same FLOPs
  (vs_dense = grouped rate / dense rate; goal >= 0.85). CPU runs fp32 with N scaled down (--cpu-gemm-rows) so the
  whole run takes about a minute; GPU runs bf16 (and the FP8 / TE backends where they run) at N = 16384.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import statistics
import time

import torch

from moe_train.kernels.grouped_gemm import grouped_mm

P = importlib.import_module("moe_train.kernels.permute")  # the package's `permute` attribute is the function

MODEL_SHAPES = {"mixtral-8x7b": (8, 4096, 14336), "mixtral-8x22b": (8, 6144, 16384)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, reps: int, device: torch.device, warmup: int = 2) -> dict:
    """Median seconds of every fn over reps calls after warm-ups (which also compile Triton kernels).
    Round-robin (one call of each fn per round), so that a change in machine load hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_plan(T: int, k: int, E: int, null_frac: float, device: torch.device):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=g)
    idx = scores.topk(k, dim=1).indices  # k distinct experts per token, random load
    idx[torch.rand(T, k, generator=g) < null_frac] = -1
    w = torch.rand(T, k, generator=g) * (idx >= 0)
    return idx.to(device), w.to(device)


def bench_permute(args, device: torch.device, dtype: torch.dtype, has_triton: bool) -> None:
    if args.quick:
        shapes = [(4096, 1024, k, nf) for k in (2, 8) for nf in (0.0, 0.5)]
    elif device.type == "cuda":
        shapes = [(T, D, k, nf) for T in (4096, 16384) for D in (256, 1024, 4096) for k in (2, 8) for nf in (0.0, 0.5)]
    else:  # CPU: the largest cases (16384 x 4096 x 8 = 2 GiB of rows) would take minutes here
        shapes = [(T, D, k, nf) for T, D in ((4096, 256), (4096, 4096), (16384, 1024)) for k in (2, 8)
                  for nf in (0.0, 0.5)]
    E = 8
    backends = ["torch"] + (["triton"] if has_triton and device.type == "cuda" else [])
    for T, D, k, nf in shapes:
        idx, w = make_plan(T, k, E, nf, device)
        w = w.to(dtype)
        x = torch.randn(T, D, device=device, dtype=dtype)
        perm = P.build_permutation(idx, E, backend="torch")
        N = perm.num_rows
        y = torch.randn(N, D, device=device, dtype=dtype)
        s = x.element_size()
        common = dict(bench="permute", device=device.type, dtype=str(dtype).removeprefix("torch."), T=T, D=D, k=k,
                      null_frac=nf, N=N, threads=torch.get_num_threads())
        build_ms = timed({b: lambda b=b: P.build_permutation(idx, E, backend=b) for b in backends},
                         args.reps or 5, device)
        perms = {b: P.build_permutation(idx, E, backend=b) for b in backends}
        for op, nbytes in (("permute", 2 * N * D * s), ("unpermute_combine", (N + T) * D * s)):
            src = torch.randn(max(nbytes // 2 // s, 1), device=device, dtype=dtype)
            # every implementation allocates its output, so the copy does too (on CPU, first-touch page faults of a
            # fresh buffer cost about as much as the copy itself)
            fns = {"memcpy": lambda: src.clone()}
            if op == "permute":
                fns["index_select"] = lambda: x.index_select(0, perm.token_N)
                for b in backends:
                    fns[b] = lambda b=b: P.permute(x, perms[b], backend=b)
            else:
                fns["index_add_"] = lambda: torch.zeros(T, D, device=device, dtype=dtype).index_add_(0, perm.token_N, y)
                for b in backends:
                    fns[b] = lambda b=b: P.unpermute_combine(y, perms[b], w, T, backend=b)
            secs = timed(fns, args.reps or 5, device)
            gbps = {name: nbytes / t / 1e9 for name, t in secs.items()}
            print(json.dumps(dict(common, op=op, bytes=nbytes, GBps={n: round(v, 2) for n, v in gbps.items()},
                                  vs_memcpy={n: round(v / gbps["memcpy"], 3) for n, v in gbps.items() if n != "memcpy"},
                                  build_ms={b: round(1e3 * v, 3) for b, v in build_ms.items()})), flush=True)


def bench_gemm(args, device: torch.device) -> None:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    N = 16384 if on_gpu else args.cpu_gemm_rows
    backends = ["grouped_mm", "loop"]
    if on_gpu:
        if torch.cuda.get_device_capability(device) >= (8, 9):
            backends += ["fp8_rowwise", "fp8_tensorwise"]
        if importlib.util.find_spec("transformer_engine") is not None:
            backends += ["te", "te_fp8"]
    unit, scale = ("TFLOPs", 1e12) if on_gpu else ("GFLOPs", 1e9)
    for model, (E, D, F) in MODEL_SHAPES.items():
        if args.quick and model != "mixtral-8x7b":
            continue
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(E, D, F, generator=g) / D ** 0.5).to(device, dtype).requires_grad_(True)
        x = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(True)
        w0 = w[0].detach().clone().requires_grad_(True)  # the dense baseline's own [D, F] weight
        for routing in ("balanced", "skewed"):
            modes = ("fwd", "fwd+bwd") if routing == "balanced" or on_gpu else ("fwd",)  # CPU: keep it ~1-2 min
            if routing == "balanced":
                counts = torch.full((E,), N // E, dtype=torch.int64)
            else:  # a Zipf-like load with one idle expert: the grouped kernel must not pay for the imbalance
                share = torch.tensor([1 / (i + 1) for i in range(E - 1)] + [0.0])
                counts = (share / share.sum() * N).floor().to(torch.int64)
                counts[0] += N - int(counts.sum())
            counts = counts.to(device)
            gy = torch.randn(N, F, generator=g).to(device, dtype)
            for mode in modes:
                flops = 2 * N * D * F * (1 if mode == "fwd" else 3)

                def step(fn, weight):
                    if mode == "fwd":
                        return lambda: fn().detach()
                    return lambda: torch.autograd.grad(fn(), (x, weight), gy)

                fns = {"dense": step(lambda: x @ w0, w0)}  # the same FLOPs in one plain matmul
                for b in backends:
                    fns[b] = step(lambda b=b: grouped_mm(x, w, counts, b), w)
                with torch.set_grad_enabled(mode != "fwd"):
                    secs = timed(fns, args.reps or (5 if on_gpu else 3), device, warmup=2 if on_gpu else 1)
                rate = {name: flops / t / scale for name, t in secs.items()}
                print(json.dumps(dict(bench="grouped_gemm", device=device.type, dtype=str(dtype).removeprefix("torch."),
                                      model=model, E=E, D=D, F=F, N=N, routing=routing, counts=counts.tolist(),
                                      mode=mode, threads=torch.get_num_threads(),
                                      **{unit: {n: round(v, 2) for n, v in rate.items()}},
                                      vs_dense={n: round(v / rate["dense"], 3) for n, v in rate.items()
                                                if n != "dense"})), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("permute", "gemm"))
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5, 3 for the CPU grouped GEMM)")
    ap.add_argument("--cpu-gemm-rows", type=int, default=256, help="rows N of the CPU grouped GEMM (scaled down)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    has_triton = importlib.util.find_spec("triton") is not None
    print(json.dumps(dict(bench="env", device=device.type, torch=torch.__version__, threads=torch.get_num_threads(),
                          cpu=platform.processor() or platform.machine(), triton=has_triton,
                          gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)), flush=True)
    if args.only in (None, "permute"):
        bench_permute(args, device, torch.bfloat16 if device.type == "cuda" else torch.float32, has_triton)
    if args.only in (None, "gemm"):
        bench_gemm(args, device)


if __name__ == "__main__":
    main()
