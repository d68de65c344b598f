"""One GPU check of the GPU-only paths, under 10 minutes on one H100, one JSON file (../shared/GPU.md).

    PYTHONPATH=. python bench/gpu_check.py --out results/            # writes results/gpu_check.json
    python bench/gpu_check.py --cpu-smoke --out /tmp/x                # tiny shapes on CPU: the script cannot rot

From a bare checkout it imports moe_train from the checkout itself (bench/..) when it is not installed; if that
fails it says how to install it and exits with status 2.
Sections, each with what it is compared to. A section that raises records its error; a kernel whose values disagree
with the torch reference is a FAILED check (exit status 1, named in the summary); the rest still run. Each section
has a time box (cases past it are recorded as skipped) and a watchdog ends the run at 9.5 minutes, writing what it
has:
  permute      the Triton permutation kernels compiled for real (permute_backend triton) against the torch reference at
               8 / 64 / 256 experts with null slots and all-null tokens: rows, counts, values and gradients (an
               expert-dependent scale makes a row in the wrong expert group visible; null slots must get exactly 0);
               GB/s of permute and of unpermute+combine (bytes read + written) against the GPU's HBM bandwidth
  routing      the one-pass Triton routing kernel (kernels/triton_routing.py) against route_topk_torch at 64 / 128 /
               256 experts, with null experts and all-null tokens, bf16 and fp32 logits, softmax and sigmoid + bias:
               picks (exactly; a swap of two scores equal to 1e-6 is a recorded near-tie), weights, scores, counts,
               logit gradients; time per call against the reference
  grouped_gemm torch._grouped_mm bf16 forward and backward (dgrad + wgrad) TFLOP/s with balanced and skewed (Zipf)
               loads at Mixtral-8x7B (D 4096, F 14336), 8x22B (D 6144, F 16384) and DeepSeek-V3 expert (D 7168,
               F 2048) shapes, against the bf16 peak; the forward against the per-expert loop (relative error)
  fp8          the FP8 backends (fp8_rowwise, fp8_tensorwise: torch._scaled_mm / _scaled_grouped_mm; te_fp8 when
               Transformer Engine is installed) against bf16 at the 8x7B shape: TFLOP/s, speedup (bf16 time / FP8
               time) and relative error (above 0.1 is a FAILED check)
  null_layer   one 8x7B-shaped MoE layer forward+backward, top-2, with 0 / 25 / 50 % of the picks made null: time
               ratio against the assignment ratio (goal: time saved >= 90 % of assignments saved)
  memory       one 8x22B-shaped decoder layer in bf16 whose experts module holds the expert shard one of 16 GPUs
               holds (ep 8: 1 expert) and computes the rows a rank receives at balanced routing (T x top-2), forward
               + backward at T = 2048 tokens: torch.cuda.max_memory_allocated against the planner's bytes for that
               layer (parameters + its activation formula + the backward transient, moe_train/planner/)
  collectives  moe_train's collective layer (parallel/collectives.py) on a one-rank group of the backend training
               uses here (NCCL on a GPU, gloo on CPU): tensors on the group's device pass, others are refused with
               CollectiveDeviceError, Ada-K's warm-start statistics reduce (they were CPU tensors NCCL refused)
  deepep_indices  only where deep_ep imports and CUDA is present (else recorded as skipped with the reason): a
               one-rank NCCL deep_ep.Buffer; at 0 / 25 / 50 % null picks the indices Megatron's flex dispatcher gets
               from moe_train (parallel/megatron/flex.py deepep_topk: true experts, then -1) go through DeepEP's
               get_dispatch_layout and dispatch: tokens per expert, tokens sent and received rows (with their
               sources) against the plan's true assignments; Megatron's own topk conversion is recorded beside it.
               DeepEP's intranode kernels are built for 2 / 4 / 8 ranks: a refused one-rank dispatch is recorded
               as dispatch_refused (the layout is still checked)
What one GPU cannot test is listed in the JSON (not_tested_on_one_gpu) and printed: NCCL across ranks, DeepEP across
ranks, the all-to-all overlap on NCCL streams.
--cpu-smoke runs every section at tiny shapes on CPU with the torch parts only (the kernel under test is then the
torch path itself, so every comparison runs; FP8 through torch._scaled_mm's CPU emulation) and measures memory with
torch's MemTracker. Without CUDA and without --cpu-smoke the script exits with status 2 and says so.
Only torch and the standard library are imported at module level: the GPU machine has no datasets, deepspeed,
megatron or transformer_engine (../shared/GPU.md).
Shape legend: T tokens, D hidden, F expert FFN width, E experts, K slots, N rows, Z null experts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: bench/..
WATCHDOG_S = 570.0  # the whole run stays under 10 minutes on one GPU
# per-section time boxes (seconds): past its box a section skips its remaining cases (Triton compiles included)
TIME_BOX_S = {"permute": 75, "routing": 75, "grouped_gemm": 90, "fp8": 45, "null_layer": 60, "memory": 45,
              "collectives": 30, "deepep_indices": 60}
NOT_TESTED_ON_ONE_GPU = [
    "NCCL collectives across ranks: the expert all-to-all (dispatch / combine), FSDP2's all-gather / reduce-scatter "
    "and the metric all-reduces run here on a one-rank group only",
    "DeepEP across ranks: its intranode kernels need 2 / 4 / 8 ranks and internode needs RDMA; one rank checks the "
    "indices and the layout only",
    "the all-to-all overlap (parallel.a2a_overlap_chunks) on NCCL streams, and expert-parallel load imbalance",
]


def import_moe_train() -> bool:
    """moe_train as installed, else from this checkout (a bare checkout on the GPU machine has no install: no
    registry there for pip's build dependencies). False, after saying what to do, when neither imports."""
    try:
        import moe_train  # noqa: F401
        return True
    except ImportError as e:
        if e.name not in ("moe_train", None):
            print(f"gpu_check: moe_train needs {e.name!r}, which is not installed ({e})", file=sys.stderr)
            return False
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import moe_train  # noqa: F401,F811
        return True
    except ImportError as e:
        print(f"gpu_check: cannot import moe_train ({e}); from the checkout root run "
              "`pip install --no-deps --no-build-isolation -e .` or `PYTHONPATH=. python bench/gpu_check.py ...`",
              file=sys.stderr)
        return False


class Clock:
    """Median seconds of fn over reps after warm-up: CUDA events on a GPU, perf_counter on CPU. ``deadline`` (set per
    section by run) is the section's time box: past it, fewer reps (at least one) and ``over()`` tells a section to
    skip its remaining cases."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.deadline = float("inf")

    def over(self) -> bool:
        return time.perf_counter() > self.deadline

    def __call__(self, fn, reps: int = 10, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            if self.over():
                break
        return statistics.median(times)


def speedup(reference_s: float, candidate_s: float) -> float:
    """How many times faster the candidate runs: reference time / candidate time (> 1: faster)."""
    return reference_s / candidate_s


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: exact kernels give ~0, a different summation order a few of the dtype's
    epsilons, a wrong row or index O(1)."""
    got, ref = got.float(), ref.float()
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def _gpu_figures(device: torch.device) -> dict:
    from moe_train.planner.hardware import GPUS

    if device.type != "cuda":
        return {"name": "cpu", "hbm_bytes_per_s": None, "bf16_tflops": None}
    name = torch.cuda.get_device_name(device).lower()
    key = next((k for k in GPUS if k in name), "h100")
    spec = GPUS[key]
    return {"name": torch.cuda.get_device_name(device), "table_row": key, "hbm_bytes_per_s": spec.hbm_bytes_per_s,
            "bf16_tflops": spec.bf16_tflops, "fp8_tflops": spec.fp8_tflops}


def _routing(T: int, E: int, K: int, device, null: float = 0.0, seed: int = 0, all_null: float = 0.0):
    """[T, K] distinct experts per token, a fraction ``null`` of the slots -1 (weight 0) and the first
    ``all_null`` fraction of the tokens with every slot -1."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    drop = torch.rand(T, K, generator=g) < null
    drop[:int(T * all_null)] = True
    idx_TK = torch.where(drop, -1, idx_TK)
    w_TK = torch.where(drop, 0.0, torch.rand(T, K, generator=g))
    return idx_TK.to(device), w_TK.to(device)


def _kernel_backend(dev) -> str:
    """The backend under test: the compiled Triton kernels on a GPU; on CPU (smoke) the torch path, so that every
    comparison still runs (never TRITON_INTERPRET: Triton 3.6's interpreter fails with numpy 2.4)."""
    return "triton" if dev.type == "cuda" else "torch"


def _permute_pass(x_TD, idx_TK, w_TK, E: int, backend: str) -> dict:
    """permute -> rows scaled by their expert (a row in the wrong group changes the result) -> unpermute_combine,
    forward and backward with a fixed output gradient."""
    from moe_train.kernels.permute import build_permutation, permute, unpermute_combine

    T = x_TD.shape[0]
    xb, wb = x_TD.clone().requires_grad_(True), w_TK.clone().requires_grad_(True)
    perm = build_permutation(idx_TK, E, backend=backend)
    scale_E = 1.0 + (torch.arange(E, device=x_TD.device) % 8).to(x_TD.dtype) / 8  # neighbours differ by >= 1/8
    scale_N = torch.repeat_interleave(scale_E, perm.counts_E)
    y = unpermute_combine(permute(xb, perm, backend=backend) * scale_N[:, None], perm, wb, T, backend=backend)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)
    y.backward(g)
    return {"values": y.detach(), "grad_x": xb.grad, "grad_w": wb.grad, "counts": perm.counts_E,
            "slots": perm.slot_N}


permute_under_test = _permute_pass  # tests replace it to see a wrong kernel fail the run


def check_permute(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.kernels.permute import build_permutation, permute, unpermute_combine

    T, D = s["T"], s["D"]
    # bf16: a few roundings of the K products and their sum, taken in another order (~0.01 seen), far below a
    # misplaced row (>= 1/8 of its value); fp32: a few epsilons
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    kb = _kernel_backend(dev)
    out, failures = {"kernel": kb, "reference": "torch"}, []
    for E, K, null, all_null in s["permute_cases"]:
        case = f"E{E}_K{K}_null{null}_allnull{all_null}"
        if clock.over():
            out[case] = {"skipped": "time box"}
            continue
        idx, w = _routing(T, E, K, dev, null=null, all_null=all_null)
        x = torch.randn(T, D, device=dev, dtype=dtype)
        ref = _permute_pass(x, idx, w, E, "torch")
        got = permute_under_test(x, idx, w, E, kb)
        res = {"true_assignments": int((idx >= 0).sum()), "all_null_tokens": int((idx < 0).all(1).sum())}
        res.update({f"rel_err_{n}": _rel_err(got[n], ref[n]) for n in ("values", "grad_x", "grad_w")})
        bad = [n for n in ("values", "grad_x", "grad_w") if not res[f"rel_err_{n}"] <= tol]
        bad += [n for n in ("counts", "slots") if not torch.equal(got[n], ref[n])]
        # null slots are never touched: their weight gradient and the output of an all-null token are exactly 0
        if bool(got["grad_w"][idx < 0].any()):
            bad.append("grad_w_of_null_slots_not_0")
        if bool(got["values"][(idx < 0).all(1)].any()):
            bad.append("all_null_tokens_not_0")
        failures += [f"{case}: {n}" for n in bad]
        perm = build_permutation(idx, E, backend=kb)
        n_rows = res["true_assignments"]
        moved = 2 * n_rows * D * x.element_size()  # rows read + rows written
        for b in dict.fromkeys([kb, "torch"]):
            pb = perm if b == kb else build_permutation(idx, E, backend=b)
            t_perm = clock(lambda: permute(x, pb, backend=b))
            y_nd = permute(x, pb, backend=b)
            t_comb = clock(lambda: unpermute_combine(y_nd, pb, w, T, backend=b))
            r = {"permute_GBps": moved / t_perm / 1e9,
                 "unpermute_combine_GBps": (moved + T * D * x.element_size()) / t_comb / 1e9}
            if gpu.get("hbm_bytes_per_s"):
                r["permute_vs_hbm"] = r["permute_GBps"] * 1e9 / gpu["hbm_bytes_per_s"]
                r["unpermute_combine_vs_hbm"] = r["unpermute_combine_GBps"] * 1e9 / gpu["hbm_bytes_per_s"]
            res[b] = r
        out[case] = res
    if failures:
        out["failures"] = failures
    last = [v for v in out.values() if isinstance(v, dict) and kb in v]
    if last:
        out["headline"] = (f"{kb} permute {last[-1][kb]['permute_GBps']:.0f} GB/s, combine "
                           f"{last[-1][kb]['unpermute_combine_GBps']:.0f} GB/s (largest E)")
    return out


def _route_pass(logits_TN, K: int, E: int, bias_N, score_func: str, backend: str) -> dict:
    """One routing pass and the logits' gradient through the weights and the scores (fixed output gradients)."""
    from moe_train.kernels.routing import route_topk

    z = logits_TN.detach().clone().requires_grad_(True)
    r = route_topk(z, K, E, bias_N, norm_topk_prob=True, score_func=score_func, backend=backend)
    # random output gradients (smooth ones cancel inside the softmax backward, leaving fp32 noise), scaled so that
    # the logits' gradient is O(1) (a score is ~1/N, a weight ~1/K): errors compare to its maximum
    g = torch.Generator(device="cpu").manual_seed(5)
    gw = (K * torch.randn(r.weight_TK.shape, generator=g)).to(z.device)
    gp = (z.shape[1] * torch.randn(r.probs_TN.shape, generator=g)).to(z.device)
    ((r.weight_TK * gw).sum() + (r.probs_TN * gp).sum()).backward()
    return {"probs": r.probs_TN.detach(), "weights": r.weight_TK.detach(), "idx": r.expert_idx_TK,
            "counts": r.counts_N, "grad": z.grad}


def route_under_test(logits_TN, K: int, E: int, bias_N, score_func: str, backend: str) -> dict:
    """The kernel's pass (tests replace this to see a wrong kernel fail the run)."""
    return _route_pass(logits_TN, K, E, bias_N, score_func, backend)


def _compare_routing(got: dict, ref: dict, bias_N, grad_tol: float) -> tuple[dict, list[str]]:
    """Picks exactly, except near-ties: a token whose picks differ only between selection scores equal to 1e-6
    (the kernel's exp and sum are not torch's) is counted, not failed; its weights and gradient are not compared.
    Scores and weights are fp32 on both sides (1e-5); the logits' gradient has the logits' dtype (``grad_tol``)."""
    score = ref["probs"] + (0 if bias_N is None else bias_N.float())
    differ_T = (got["idx"] != ref["idx"]).any(1)
    ties = 0
    if differ_T.any():
        # the selection scores of each side's picks, sorted: equal up to 1e-6 when the differing picks were tied
        def picked(idx):
            # null picks are -1 in expert_idx: their score is compared through the sorted remainder of true picks
            s_TK = torch.where(idx >= 0, score.gather(1, idx.clamp(min=0)), float("-inf"))
            return s_TK.sort(1, descending=True).values[differ_T]
        a, b = picked(got["idx"]), picked(ref["idx"])
        finite = torch.isfinite(a) & torch.isfinite(b)
        same_nulls = torch.equal(torch.isfinite(a), torch.isfinite(b))
        ties = int(differ_T.sum()) if same_nulls and bool(((a - b).abs() <= 1e-6)[finite].all()) else 0
    agree_T = ~differ_T
    res = {"tokens": int(differ_T.numel()), "tokens_with_different_picks": int(differ_T.sum()), "near_ties": ties,
           "all_null_tokens": int((ref["idx"] < 0).all(1).sum()),
           "rel_err_probs": _rel_err(got["probs"], ref["probs"]),
           "rel_err_weights": _rel_err(got["weights"][agree_T], ref["weights"][agree_T]),
           "rel_err_grad": _rel_err(got["grad"][agree_T], ref["grad"][agree_T]),
           "counts_equal": bool(torch.equal(got["counts"], ref["counts"]))}
    bad = []
    if res["tokens_with_different_picks"] > ties:
        bad.append(f"picks differ on {res['tokens_with_different_picks'] - ties} tokens")
    if not res["counts_equal"] and not ties:
        bad.append("counts differ")
    bad += [n for n, tol in (("rel_err_probs", 1e-5), ("rel_err_weights", 1e-5), ("rel_err_grad", grad_tol))
            if not res[n] <= tol]
    return res, bad


def check_routing(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    """The routing kernel against route_topk_torch (module docstring)."""
    from moe_train.kernels.routing import route_topk

    T = s["T"]
    kb = _kernel_backend(dev)
    out, failures = {"kernel": kb, "reference": "torch"}, []
    for E, Z, K, logit_dtype, score_func, biased in s["routing_cases"]:
        case = f"E{E}_Z{Z}_K{K}_{logit_dtype}_{score_func}{'_bias' if biased else ''}"
        if clock.over():
            out[case] = {"skipped": "time box"}
            continue
        g = torch.Generator(device="cpu").manual_seed(E + Z + K)
        z = torch.randn(T, E + Z, generator=g)
        if Z:  # the first 10 % of the tokens prefer every null expert: all-null tokens (when Z >= K)
            z[:T // 10, E:] += 20.0
        z = z.to(dev, getattr(torch, logit_dtype))
        bias = (0.01 * torch.randn(E + Z, generator=g)).to(dev) if biased else None
        ref = _route_pass(z, K, E, bias, score_func, "torch")
        got = route_under_test(z, K, E, bias, score_func, kb)
        res, bad = _compare_routing(got, ref, bias, 8e-3 if logit_dtype == "bfloat16" else 1e-5)  # bf16: 2 ulps
        failures += [f"{case}: {b}" for b in bad]
        for b in dict.fromkeys([kb, "torch"]):
            res[f"{b}_us"] = 1e6 * clock(lambda: route_topk(z, K, E, bias, True, score_func, backend=b))
        res["speedup_vs_torch"] = speedup(res["torch_us"], res[f"{kb}_us"])
        out[case] = res
    if failures:
        out["failures"] = failures
    done = [v for v in out.values() if isinstance(v, dict) and "speedup_vs_torch" in v]
    if done:
        out["headline"] = (f"{kb} vs torch: {min(v['speedup_vs_torch'] for v in done):.1f}-"
                           f"{max(v['speedup_vs_torch'] for v in done):.1f}x; near-ties "
                           f"{sum(v['near_ties'] for v in done)}")
    return out


def _loads(N: int, E: int, kind: str, device) -> torch.Tensor:
    """Rows per expert summing to N: balanced (N / E each) or skewed (Zipf: expert e's share ~ 1 / (e + 1), the
    hottest expert 2.7x the mean at E = 8 and 7.8x at E = 32)."""
    share = torch.ones(E, dtype=torch.float64) if kind == "balanced" else 1.0 / torch.arange(1, E + 1,
                                                                                              dtype=torch.float64)
    counts = (share / share.sum() * N).floor().to(torch.int64)
    counts[0] += N - int(counts.sum())
    return counts.to(device)


def _time_backward(clock: Clock, forward, inputs: tuple) -> float:
    """Seconds of the backward alone: one forward graph, its gradient taken repeatedly (retain_graph), freed after."""
    y = forward()
    gy = torch.randn_like(y)
    return clock(lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True))


def check_grouped_gemm(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    """y = x @ w[expert] with torch._grouped_mm: forward (2NDF FLOPs) and backward (dgrad + wgrad, 4NDF FLOPs)."""
    from moe_train.kernels.grouped_gemm import grouped_mm, grouped_mm_loop

    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    peak = gpu.get("bf16_tflops") if dtype == torch.bfloat16 else None
    out, failures = {}, []
    for name, (D, F) in s["gemm_shapes"].items():
        E, N = s["gemm_layout"][name]
        for kind in ("balanced", "skewed"):
            case = f"{name}_{kind}"
            if clock.over():
                out[case] = {"skipped": "time box"}
                continue
            counts = _loads(N, E, kind, dev)
            x = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(E, D, F, device=dev, dtype=dtype) / D ** 0.5).requires_grad_(True)
            with torch.no_grad():
                fwd = clock(lambda: grouped_mm(x, w, counts, "grouped_mm"))
                err = _rel_err(grouped_mm(x, w, counts, "grouped_mm"), grouped_mm_loop(x, w, counts))
            bwd = _time_backward(clock, lambda: grouped_mm(x, w, counts, "grouped_mm"), (x, w))
            flops = 2 * N * D * F
            r = {"D": D, "F": F, "experts": E, "rows": N, "max_rows_per_expert": int(counts.max()),
                 "dtype": str(dtype), "fwd_tflops": flops / fwd / 1e12, "bwd_tflops": 2 * flops / bwd / 1e12,
                 "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "rel_err_vs_loop": err}
            if peak:
                r["fwd_vs_bf16_peak"] = r["fwd_tflops"] / peak
                r["bwd_vs_bf16_peak"] = r["bwd_tflops"] / peak
            if not err <= tol:
                failures.append(f"{case}: grouped_mm differs from the per-expert loop (rel err {err:.2e})")
            out[case] = r
            if dev.type == "cuda":
                del x, w
                torch.cuda.empty_cache()
    if failures:
        out["failures"] = failures
    done = {k: v for k, v in out.items() if isinstance(v, dict) and "fwd_tflops" in v}
    if done:
        out["headline"] = ", ".join(f"{k} {v['fwd_tflops']:.0f}/{v['bwd_tflops']:.0f}" for k, v in done.items()
                                    if k.endswith("balanced")) + " TFLOP/s fwd/bwd (balanced)"
    return out


def check_fp8(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.kernels.grouped_gemm import grouped_mm

    D, F = s["gemm_shapes"]["mixtral_8x7b"]
    E, N = s["gemm_layout"]["mixtral_8x7b"]
    x = torch.randn(N, D, device=dev, dtype=dtype)
    w = torch.randn(E, D, F, device=dev, dtype=dtype) / D ** 0.5
    counts = _loads(N, E, "balanced", dev)
    flops = 2 * N * D * F
    ref = grouped_mm(x, w, counts, "grouped_mm").float()
    bf16_s = clock(lambda: grouped_mm(x, w, counts, "grouped_mm"))
    out = {"bf16_tflops": flops / bf16_s / 1e12}  # the reference's dtype: fp32 in the CPU smoke
    backends = ["fp8_rowwise", "fp8_tensorwise"]
    if dev.type != "cuda":
        # torch._scaled_mm runs on CPU (the dequantised product): the recipe and this section's code, no speed
        out["note"] = "CPU: FP8 emulated by torch._scaled_mm; timings mean nothing"
    else:
        try:
            import transformer_engine  # noqa: F401

            backends.append("te_fp8")
        except ImportError:
            out["te_fp8"] = {"skipped": "transformer_engine not installed"}
    failures = []
    for b in backends:
        if clock.over():
            out[b] = {"skipped": "time box"}
            continue
        try:
            y = grouped_mm(x, w, counts, b).float()
            secs = clock(lambda: grouped_mm(x, w, counts, b))
            err = ((y - ref).norm() / ref.norm()).item()
            out[b] = {"tflops": flops / secs / 1e12, "speedup_vs_bf16": speedup(bf16_s, secs), "rel_error": err}
            if gpu.get("fp8_tflops"):
                out[b]["vs_fp8_peak"] = out[b]["tflops"] / gpu["fp8_tflops"]
            if not err <= 0.1:  # e4m3 keeps 3 mantissa bits: ~3-5 % is expected, more is a broken recipe
                failures.append(f"{b}: relative error {err:.3f} against bf16")
        except Exception as e:  # noqa: BLE001 - one backend's failure is a finding, not the end of the check
            out[b] = {"error": f"{type(e).__name__}: {e}"}
    if failures:
        out["failures"] = failures
    sp = {b: out[b]["speedup_vs_bf16"] for b in backends if "speedup_vs_bf16" in out.get(b, {})}
    if sp:
        out["headline"] = ", ".join(f"{b} {v:.2f}x bf16" for b, v in sp.items())
    return out


def _layer(D: int, F: int, E: int, K: int, dev, dtype, router: str = "topk"):
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.moe_layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(ModelConfig(hidden_size=D, intermediate_size=F, moe=MoEConfig(router=router, num_experts=E,
                                                                                   top_k=K)))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.02)
    return layer.to(dev, dtype)


def check_null_layer(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.routing.plan import counts_from_idx
    from moe_train.routing.topk import renormalize

    D, F = s["gemm_shapes"]["mixtral_8x7b"]
    E, K, T = s["E"], s["K"], s["T"]
    layer = _layer(D, F, E, K, dev, dtype)
    x = torch.randn(T, D, device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    out = {}
    for null in (0.0, 0.25, 0.5):
        keep = (torch.rand(T, K, generator=g) >= null).to(dev)
        if clock.over() and null:
            out[str(null)] = {"skipped": "time box"}
            continue

        def step():
            xi = x.detach().requires_grad_(True)
            plan = layer.router(xi)
            plan.expert_idx_TK = torch.where(keep, plan.expert_idx_TK, -1)
            plan.weight_TK = renormalize(plan.weight_TK, keep)
            plan.counts_E = counts_from_idx(plan.expert_idx_TK, E)
            y = layer.dispatcher(xi, plan, layer.experts)
            y.backward(torch.ones_like(y))
            layer.zero_grad(set_to_none=True)

        out[str(null)] = {"assignments": int(keep.sum()), "seconds": clock(step, reps=s["reps"], warmup=2)}
    base = out["0.0"]
    for r in [v for v in out.values() if "seconds" in v]:
        r["assignment_ratio"] = r["assignments"] / base["assignments"]
        r["time_ratio"] = r["seconds"] / base["seconds"]
        saved = 1 - r["assignment_ratio"]
        r["time_saved_over_assignments_saved"] = (1 - r["time_ratio"]) / saved if saved else None
    # ../shared/REFERENCE.md section 5b: Megatron-Core's MoE-layer baseline (H100, EP8, 4096 tokens per rank, top-2,
    # forced balance): 4.33 ms forward + 7.68 ms backward. Ours here: one GPU holding all 8 experts (no all-to-all).
    out["megatron_core_reference_ms"] = {"forward": 4.33, "backward": 7.68, "total": 12.01,
                                         "setting": "H100, EP8, 4096 tokens/rank, top-2 (a different layout)"}
    half = out.get("0.5", {})
    out["headline"] = f"top-2 {base['seconds'] * 1e3:.2f} ms fwd+bwd" + (
        f"; 50 % null: time x{half['time_ratio']:.2f} for assignments x{half['assignment_ratio']:.2f}"
        if "time_ratio" in half else "")
    return out


def check_memory(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    """One 8x22B-shaped decoder layer, bf16 parameters (as FSDP2's bf16 all-gather gives them), the expert shard of
    one of 16 GPUs (ep 8 -> 1 local expert) computing T x K rows (a balanced rank's share)."""
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.decoder import DecoderLayer, RotaryEmbedding
    from moe_train.parallel.parallelize import shard_experts
    from moe_train.planner.activations import Regime, layer_activations

    D, F = s["gemm_shapes"]["mixtral_8x22b"]
    E, K, T, H, G = s["E"], s["K"], s["T_memory"], s["heads"], s["kv_heads"]
    cfg = ModelConfig(hidden_size=D, intermediate_size=F, num_heads=H, num_kv_heads=G, max_seq_len=T,
                      moe=MoEConfig(router="topk", num_experts=E, top_k=K))
    torch.manual_seed(0)
    layer = DecoderLayer(cfg)
    with torch.no_grad():
        for p in layer.moe.experts.parameters():  # created with torch.empty
            p.normal_(std=0.02)
    shard_experts(layer.moe.experts, 0, E)  # ep = E: one local expert, as each of 8 ep ranks holds
    layer = layer.to(dev, dtype)
    inner = layer.moe.router.forward

    def one_expert(x_TD):  # every pick goes to the local expert: it receives T x K rows, the balanced share
        plan = inner(x_TD)
        plan.expert_idx_TK = torch.zeros_like(plan.expert_idx_TK)
        plan.counts_E = torch.tensor([plan.expert_idx_TK.numel()], device=x_TD.device)
        return plan

    layer.moe.router.forward = one_expert
    cos, sin = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta).to(dev)(torch.arange(T, device=dev))
    x = torch.randn(1, T, D, device=dev, dtype=dtype, requires_grad=True)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    la = layer_activations(layer, Regime(c=dtype.itemsize, r=dtype.itemsize, autocast=False))
    predicted_acts = la.bytes(T, T * K, T * K)
    predicted_bwd = 3 * dtype.itemsize * F * T * K + 2 * dtype.itemsize * D * T  # planner/memory.py layer backward

    def step():
        y, _ = layer(x, cos, sin)
        y.backward(torch.ones_like(y))

    step()  # gradients allocated once (as in training); measure the second step
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated(dev) - base
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(layer)
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
        peak_extra = next(iter(snap.values()))["Total"] - 2 * params  # tracker counts parameters and gradients
    ratio = (predicted_acts + predicted_bwd) / peak_extra
    return {"tokens": T, "rows": T * K, "parameter_bytes": params, "measured_fwd_bwd_extra_bytes": peak_extra,
            "predicted_activation_bytes": predicted_acts, "predicted_backward_transient_bytes": predicted_bwd,
            "predicted_extra_bytes": predicted_acts + predicted_bwd, "ratio_predicted_over_measured": ratio,
            "headline": f"measured {peak_extra / 2**30:.2f} GiB above parameters, planner x{ratio:.2f} of it"}


def check_collectives(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    """moe_train's collective layer on a one-rank group of the backend training uses on this device (NCCL on a GPU,
    gloo on CPU): the device check lets the group's tensors through and refuses others, and Ada-K's warm-start
    statistics (CPU tensors that NCCL refused before) reduce. ParallelContext(world_size=2) only makes the helpers
    take their distributed path; the group has one rank, so a sum is the tensor itself."""
    import socket

    import torch.distributed as dist

    from moe_train.parallel import collectives as C
    from moe_train.parallel.distributed import ParallelContext
    from moe_train.train.adak import mean_stats_over_ranks

    if dist.is_initialized():
        return {"skipped": "a process group already exists in this process"}
    backend = "nccl" if dev.type == "cuda" else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    checks, out = {}, {"backend": backend}
    try:
        ctx = ParallelContext(world_size=2, device=dev, backend=backend)
        t = torch.arange(8.0, device=dev)
        checks["all_reduce_sum"] = bool(torch.equal(C.all_reduce_sum(t, ctx), t))
        a2a = torch.empty_like(t)
        C.all_to_all_single(a2a, t, [8], [8])
        checks["all_to_all_single"] = bool(torch.equal(a2a, t))
        wrong = torch.zeros(1, device="cpu" if dev.type == "cuda" else "meta")
        try:
            C.all_reduce(wrong)
            checks["refuses_a_tensor_off_the_group_device"] = False
        except C.CollectiveDeviceError:
            checks["refuses_a_tensor_off_the_group_device"] = True
        stats = mean_stats_over_ranks({"label_k": 1.5, "label_k_per_layer": [1.0, 2.0]}, ctx)
        checks["adak_warm_start_stats"] = stats == {"label_k": 0.75, "label_k_per_layer": [0.5, 1.0]}
        if dev.type == "cuda":  # what the layer guards against, as torch reports it (recorded, not checked)
            try:
                dist.all_reduce(torch.zeros(1))
                out["nccl_with_a_cpu_tensor"] = "accepted"
            except Exception as e:  # noqa: BLE001 - the refusal itself is the finding
                out["nccl_with_a_cpu_tensor"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        dist.destroy_process_group()
    out["checks"] = checks
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        out["failures"] = bad
    out["headline"] = f"{backend}, one rank: {len(checks) - len(bad)}/{len(checks)} checks pass"
    return out


# ----------------------------------------------------------------------------------------------------------------
# deepep_indices: DeepEP itself with the [T, K] indices moe_train hands Megatron's flex dispatcher (separate from the
# sections above: it needs deep_ep and megatron-core, and it starts a one-rank NCCL process group of its own)


def _deepep_dispatch_one(buf, cfg, x, idx_TK, w_TK, E: int) -> dict:
    """get_dispatch_layout + dispatch of x with idx_TK on a one-rank buffer: what DeepEP counts and moves."""
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx_TK, E)
    out = {"layout_tokens_per_expert": per_expert.tolist(), "layout_tokens_to_rank": int(per_rank[0]),
           "layout_token_in_rank": int(in_rank[:, 0].sum())}
    try:
        recv_x, recv_idx, recv_w, recv_per_expert, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=idx_TK, topk_weights=w_TK, config=cfg)
    except Exception as e:  # noqa: BLE001 - DeepEP's intranode kernels are instantiated for 2 / 4 / 8 ranks
        out["dispatch_refused"] = f"{type(e).__name__}: {e}"
        return out
    torch.cuda.synchronize()
    src = handle[3].long()  # recv_src_idx: the source token of every received row
    out.update({"received_rows": int(recv_x.shape[0]), "received_tokens_per_expert": list(recv_per_expert),
                "received_sources": sorted(src.tolist()),
                "rows_match_sources": bool(torch.equal(recv_x, x[src]) and torch.equal(recv_idx, idx_TK[src])
                                           and torch.equal(recv_w, w_TK[src]))})
    return out


def check_deepep_indices(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    """At 0 / 25 / 50 % null picks: deepep_topk's indices (true experts, then -1) against the plan's true
    assignments in DeepEP's layout (tokens per expert, tokens sent to the rank) and dispatch (received rows and
    their sources, tokens per local expert); Megatron's own conversion (topk of the probabilities) for contrast.
    One rank over NCCL; DeepEP's recommended configs start at 2 ranks, so its 2-rank config is used."""
    if dev.type != "cuda":
        return {"skipped": "no CUDA: DeepEP needs NVIDIA GPUs (the index construction and the Megatron wiring are "
                           "CPU-tested in tests/test_flex_indices.py)"}
    try:
        import deep_ep
    except ImportError as e:
        return {"skipped": f"deep_ep is not importable ({e}): install DeepEP to run this section"}
    try:
        from moe_train.parallel.megatron.flex import deepep_topk
    except ImportError as e:
        return {"skipped": f"moe_train.parallel.megatron needs megatron-core ({e})"}
    import socket

    import torch.distributed as dist

    T, D, E, K = s["T"], s["D"], s["E"], s["K"]
    created = not dist.is_initialized()
    if created:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cfg = deep_ep.Buffer.get_dispatch_config(2)
        hidden_bytes = D * max(torch.tensor([], dtype=torch.bfloat16).element_size(), 2)
        buf = deep_ep.Buffer(dist.group.WORLD, cfg.get_nvl_buffer_size_hint(hidden_bytes, 1), 0)
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)  # DeepEP dispatches bf16 rows
        out, failures = {"deep_ep": getattr(deep_ep, "__version__", "unknown"), "T": T, "E": E, "K": K}, []
        for null in (0.0, 0.25, 0.5):
            plan_idx_TK, plan_w_TK = _routing(T, E, K, dev, null=null, seed=2)
            true_TK = plan_idx_TK >= 0
            rows = torch.arange(T, device=dev)[:, None].expand(T, K)
            routing_map = torch.zeros(T, E, dtype=torch.bool, device=dev)
            routing_map[rows[true_TK], plan_idx_TK[true_TK]] = True
            probs = torch.zeros(T, E, device=dev)
            probs[rows[true_TK], plan_idx_TK[true_TK]] = plan_w_TK[true_TK].float()
            idx_TK, w_TK = deepep_topk(routing_map, probs, K)
            truth = {"tokens_per_expert": torch.bincount(plan_idx_TK[true_TK], minlength=E).tolist(),
                     "tokens_with_a_true_expert": int(true_TK.any(1).sum()), "assignments": int(true_TK.sum())}
            ours = _deepep_dispatch_one(buf, cfg, x, idx_TK, w_TK, E)
            mega_w, mega_idx = torch.topk(probs, K, dim=-1)
            megatron = _deepep_dispatch_one(buf, cfg, x, mega_idx, mega_w, E)
            senders = torch.nonzero(true_TK.any(1)).flatten().tolist()
            checks = {"layout_tokens_per_expert": ours["layout_tokens_per_expert"] == truth["tokens_per_expert"],
                      "layout_tokens_to_rank": ours["layout_tokens_to_rank"] == truth["tokens_with_a_true_expert"]}
            if "dispatch_refused" not in ours:
                checks.update({"received_tokens_per_expert": ours["received_tokens_per_expert"]
                               == truth["tokens_per_expert"], "received_sources": ours["received_sources"] == senders,
                               "received_rows": ours["rows_match_sources"]})
            ours.pop("received_sources", None)
            megatron.pop("received_sources", None)
            out[str(null)] = {"truth": truth, "deepep_topk": ours, "megatron_topk": megatron, "checks": checks}
            failures += [f"{null}:{k}" for k, ok in checks.items() if not ok]
        del buf
    finally:
        if created:
            dist.destroy_process_group()
    if failures:
        raise AssertionError(f"DeepEP disagrees with the plan's true assignments: {failures}; details: {out}")
    return out


# gemm_layout: (local experts, rows) per shape: Mixtral 8 experts x 4096 tokens x top-2; DeepSeek-V3 256 experts
# top-8 over ep 8 = 32 local experts receiving 4096 tokens x 8 rows at balance
GPU_SHAPES = {"T": 4096, "D": 4096, "E": 8, "K": 2, "reps": 10, "T_memory": 2048, "heads": 48, "kv_heads": 8,
              "gemm_shapes": {"mixtral_8x7b": (4096, 14336), "mixtral_8x22b": (6144, 16384),
                              "deepseek_v3": (7168, 2048)},
              "gemm_layout": {"mixtral_8x7b": (8, 8192), "mixtral_8x22b": (8, 8192), "deepseek_v3": (32, 32768)},
              # (E, K, null fraction of slots, all-null fraction of tokens)
              "permute_cases": [(8, 2, 0.0, 0.0), (64, 8, 0.25, 0.05), (256, 8, 0.5, 0.1)],
              # (E true, Z null, K, logit dtype, score function, expert bias)
              "routing_cases": [(64, 0, 8, "float32", "softmax", False), (128, 32, 8, "bfloat16", "softmax", False),
                                (256, 64, 8, "float32", "sigmoid", True), (8, 8, 2, "bfloat16", "softmax", True)]}
SMOKE_SHAPES = {**GPU_SHAPES, "T": 64, "D": 32, "E": 4, "K": 2, "reps": 2, "T_memory": 32, "heads": 4,
                "kv_heads": 2,
                "gemm_shapes": {"mixtral_8x7b": (32, 64), "mixtral_8x22b": (48, 64), "deepseek_v3": (56, 16)},
                "gemm_layout": {"mixtral_8x7b": (4, 64), "mixtral_8x22b": (4, 64), "deepseek_v3": (16, 256)}}
SECTIONS = {"permute": check_permute, "routing": check_routing, "grouped_gemm": check_grouped_gemm,
            "fp8": check_fp8, "null_layer": check_null_layer, "memory": check_memory,
            "collectives": check_collectives, "deepep_indices": check_deepep_indices}


def run(cpu_smoke: bool, only: list[str] | None = None, result: dict | None = None) -> dict:
    """Every section (or ``only`` those) into ``result`` (filled as it goes: the watchdog writes what is there)."""
    dev = torch.device("cpu" if cpu_smoke else "cuda")
    dtype = torch.float32 if cpu_smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if cpu_smoke else GPU_SHAPES
    gpu, clock = _gpu_figures(dev), Clock(dev)
    result = {} if result is None else result
    result.update({"device": gpu, "torch": torch.__version__, "dtype": str(dtype), "cpu_smoke": cpu_smoke,
                   "shapes": shapes, "not_tested_on_one_gpu": NOT_TESTED_ON_ONE_GPU})
    threads = torch.get_num_threads()
    if cpu_smoke:  # tiny matmuls: more threads only spin (OpenMP stalls of 10-100x on a shared machine)
        torch.set_num_threads(1)
    try:
        _run_sections(dev, dtype, shapes, clock, gpu, only, result)
    finally:
        torch.set_num_threads(threads)
    result["failed_checks"] = {k: v["failures"] for k, v in result.items()
                               if k in SECTIONS and isinstance(v, dict) and v.get("failures")}
    return result


def _run_sections(dev, dtype, shapes: dict, clock: Clock, gpu: dict, only, result: dict) -> None:
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        result["running"] = name
        t0 = time.perf_counter()
        clock.deadline = t0 + TIME_BOX_S[name]
        try:
            result[name] = fn(dev, dtype, shapes, clock, gpu)
        except Exception as e:  # noqa: BLE001 - record and go on: one JSON with every section's outcome
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        result[name + "_seconds"] = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result.pop("running", None)


def summary(result: dict) -> str:
    """The short table printed at the end: one row per section, then what one GPU cannot test."""
    rows = [("section", "status", "seconds", "figure / finding")]
    for name in SECTIONS:
        v = result.get(name)
        if not isinstance(v, dict):
            continue
        if "error" in v:
            status, text = "ERROR", v["error"].splitlines()[0] if v["error"] else ""
        elif v.get("failures"):
            status, text = "FAILED", "; ".join(map(str, v["failures"]))
        elif "skipped" in v:
            status, text = "skipped", v["skipped"]
        else:
            status, text = "ok", v.get("headline", "")
        boxed = [k for k, c in v.items() if isinstance(c, dict) and c.get("skipped") == "time box"]
        if boxed:
            text += f" (time box: skipped {', '.join(boxed)})"
        rows.append((name, status, f"{result.get(name + '_seconds', 0.0):.1f}", text[:140]))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    if result.get("watchdog"):
        lines.append(result["watchdog"])
    lines.append("not tested on one GPU:")
    lines += [f"  - {t}" for t in result.get("not_tested_on_one_gpu", NOT_TESTED_ON_ONE_GPU)]
    return "\n".join(lines)


def _write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def _start_watchdog(result: dict, path: str, limit_s: float) -> threading.Timer:
    """Ends the run after limit_s, writing what it has (a hung or slow section must not eat the GPU's time)."""

    def fire():
        result["watchdog"] = (f"WATCHDOG: stopped after {limit_s:.0f} s in section {result.get('running')!r}; "
                              "the sections after it did not run")
        try:
            _write(dict(result), path)
            print(summary(result), flush=True)
        finally:
            os._exit(3)

    timer = threading.Timer(limit_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv=None) -> int:
    """Exit status: 0 every check passed, 1 a section raised or a kernel disagreed with its reference, 2 it cannot run
    here (no CUDA without --cpu-smoke, moe_train not importable), 3 the watchdog stopped it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json (or a .json path)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, torch parts only")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(set(only) - set(SECTIONS))}; choose from {list(SECTIONS)}")
    if not import_moe_train():
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; this check needs one GPU (see ../shared/GPU.md), or pass "
              "--cpu-smoke for the tiny CPU run", file=sys.stderr)
        return 2
    if not args.cpu_smoke and os.environ.pop("TRITON_INTERPRET", None) and "triton" not in sys.modules:
        print("gpu_check: TRITON_INTERPRET unset for this run: the kernels are checked compiled", file=sys.stderr)
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, "gpu_check.json")
    result: dict = {}
    watchdog = _start_watchdog(result, path, WATCHDOG_S)
    try:
        run(args.cpu_smoke, only, result)
    finally:
        watchdog.cancel()
    _write(result, path)
    print(summary(result))
    print(f"wrote {path}")
    errors = [k for k in SECTIONS if isinstance(result.get(k), dict) and "error" in result[k]]
    if errors:
        print(f"gpu_check: sections with errors: {errors}", file=sys.stderr)
    if result["failed_checks"]:
        print(f"gpu_check: FAILED checks (a kernel disagrees with its reference): {result['failed_checks']}",
              file=sys.stderr)
    return 1 if errors or result["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
