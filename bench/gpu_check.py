"""One GPU check of the GPU-only paths, under 8 minutes on one GPU, one JSON file (../shared/GPU.md).

    PYTHONPATH=. python bench/gpu_check.py --out results/            # writes results/gpu_check.json
    python bench/gpu_check.py --cpu-smoke --out /tmp/x                # tiny shapes on CPU: the script cannot rot

Sections, each with what it is compared to (a failing section records its error and the rest still run):
  permute      the Triton permutation kernels compiled for real (permute_backend triton) against the torch reference:
               max |difference| of values and gradients; GB/s of permute and of unpermute+combine (bytes read +
               written) against the GPU's HBM bandwidth (moe_train/planner/hardware.py)
  grouped_gemm torch._grouped_mm bf16 TFLOP/s, forward, at Mixtral-8x7B (D 4096, F 14336) and 8x22B (D 6144,
               F 16384) expert shapes, 8 experts, 4096 tokens x top-2 rows, against the bf16 peak
  fp8          the FP8 backends (fp8_rowwise, fp8_tensorwise: torch._scaled_mm / _scaled_grouped_mm; te_fp8 when
               Transformer Engine is installed) against bf16 at the 8x7B shape: TFLOP/s and relative error
  null_layer   one 8x7B-shaped MoE layer forward+backward, top-2, with 0 / 25 / 50 % of the picks made null: time
               ratio against the assignment ratio (goal: time saved >= 90 % of assignments saved)
  memory       one 8x22B-shaped decoder layer in bf16 whose experts module holds the expert shard one of 16 GPUs
               holds (ep 8: 1 expert) and computes the rows a rank receives at balanced routing (T x top-2), forward
               + backward at T = 2048 tokens: torch.cuda.max_memory_allocated against the planner's bytes for that
               layer (parameters + its activation formula + the backward transient, moe_train/planner/)
  deepep_indices  only where deep_ep imports and CUDA is present (else recorded as skipped with the reason): a
               one-rank NCCL deep_ep.Buffer; at 0 / 25 / 50 % null picks the indices Megatron's flex dispatcher gets
               from moe_train (parallel/megatron/flex.py deepep_topk: true experts, then -1) go through DeepEP's
               get_dispatch_layout and dispatch: tokens per expert, tokens sent and received rows (with their
               sources) against the plan's true assignments; Megatron's own topk conversion is recorded beside it.
               DeepEP's intranode kernels are built for 2 / 4 / 8 ranks: a refused one-rank dispatch is recorded
               as dispatch_refused (the layout is still checked)
--cpu-smoke runs every section at tiny shapes on CPU with the torch parts only (no Triton, no FP8 kernels: they are
skipped with a reason) and measures memory with torch's MemTracker. Without CUDA and without --cpu-smoke the
script exits with status 2 and says so.
Shape legend: T tokens, D hidden, F expert FFN width, E experts, K slots, N rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch


class Clock:
    """Median seconds of fn over reps after warm-up: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

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
        return statistics.median(times)


def _gpu_figures(device: torch.device) -> dict:
    from moe_train.planner.hardware import GPUS

    if device.type != "cuda":
        return {"name": "cpu", "hbm_bytes_per_s": None, "bf16_tflops": None}
    name = torch.cuda.get_device_name(device).lower()
    key = next((k for k in GPUS if k in name), "h100")
    spec = GPUS[key]
    return {"name": torch.cuda.get_device_name(device), "table_row": key, "hbm_bytes_per_s": spec.hbm_bytes_per_s,
            "bf16_tflops": spec.bf16_tflops, "fp8_tflops": spec.fp8_tflops}


def _routing(T: int, E: int, K: int, device, null: float = 0.0, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    drop = torch.rand(T, K, generator=g) < null
    idx_TK = torch.where(drop, -1, idx_TK)
    w_TK = torch.where(drop, 0.0, torch.rand(T, K, generator=g))
    return idx_TK.to(device), w_TK.to(device)


def check_permute(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.kernels.permute import build_permutation, permute, unpermute_combine

    T, D, E, K = s["T"], s["D"], s["E"], s["K"]
    idx, w = _routing(T, E, K, dev)
    x = torch.randn(T, D, device=dev, dtype=dtype)
    backends = ["torch"] + (["triton"] if dev.type == "cuda" else [])
    out, ref = {}, None
    for b in backends:
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        perm = build_permutation(idx, E, backend=b)
        y = unpermute_combine(permute(xb, perm, backend=b) * 2.0, perm, wb, T, backend=b)
        y.backward(torch.ones_like(y))
        vals = (y.detach().float(), xb.grad.float(), wb.grad.float())
        n_rows = perm.counts_E.sum().item()
        moved = 2 * n_rows * D * x.element_size()  # rows read + rows written
        t_perm = clock(lambda: permute(x, perm, backend=b))
        y_nd = permute(x, perm, backend=b)
        t_comb = clock(lambda: unpermute_combine(y_nd, perm, w, T, backend=b))
        res = {"permute_GBps": moved / t_perm / 1e9, "unpermute_combine_GBps": (moved + T * D * x.element_size())
               / t_comb / 1e9}
        if gpu.get("hbm_bytes_per_s"):
            res["permute_vs_hbm"] = res["permute_GBps"] * 1e9 / gpu["hbm_bytes_per_s"]
            res["unpermute_combine_vs_hbm"] = res["unpermute_combine_GBps"] * 1e9 / gpu["hbm_bytes_per_s"]
        if ref is None:
            ref = vals
        else:
            res.update({f"max_abs_diff_{n}": (a - r).abs().max().item()
                        for n, a, r in zip(("values", "grad_x", "grad_w"), vals, ref)})
        out[b] = res
    if dev.type != "cuda":
        out["triton"] = {"skipped": "no CUDA (the CPU suite runs the kernels under TRITON_INTERPRET=1)"}
    return out


def check_grouped_gemm(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.kernels.grouped_gemm import grouped_mm

    out = {}
    for name, (D, F) in s["gemm_shapes"].items():
        E, N = s["E"], s["T"] * s["K"]
        x = torch.randn(N, D, device=dev, dtype=dtype)
        w = torch.randn(E, D, F, device=dev, dtype=dtype) / D ** 0.5
        counts = torch.full((E,), N // E, device=dev, dtype=torch.int64)
        secs = clock(lambda: grouped_mm(x, w, counts, "grouped_mm"))
        tflops = 2 * N * D * F / secs / 1e12
        out[name] = {"D": D, "F": F, "rows": N, "experts": E, "dtype": str(dtype), "tflops": tflops}
        if gpu.get("bf16_tflops") and dtype == torch.bfloat16:
            out[name]["vs_bf16_peak"] = tflops / gpu["bf16_tflops"]
    return out


def check_fp8(dev, dtype, s: dict, clock: Clock, gpu: dict) -> dict:
    from moe_train.kernels.grouped_gemm import grouped_mm

    D, F = s["gemm_shapes"]["mixtral_8x7b"]
    E, N = s["E"], s["T"] * s["K"]
    x = torch.randn(N, D, device=dev, dtype=dtype)
    w = torch.randn(E, D, F, device=dev, dtype=dtype) / D ** 0.5
    counts = torch.full((E,), N // E, device=dev, dtype=torch.int64)
    ref = grouped_mm(x, w, counts, "grouped_mm").float()
    out = {"bf16_tflops": 2 * N * D * F / clock(lambda: grouped_mm(x, w, counts, "grouped_mm")) / 1e12}
    if dev.type != "cuda":
        return {**out, "skipped": "FP8 GEMMs need a CUDA GPU with FP8 tensor cores"}
    backends = ["fp8_rowwise", "fp8_tensorwise"]
    try:
        import transformer_engine  # noqa: F401

        backends.append("te_fp8")
    except ImportError:
        out["te_fp8"] = {"skipped": "transformer_engine not installed"}
    for b in backends:
        try:
            y = grouped_mm(x, w, counts, b).float()
            secs = clock(lambda: grouped_mm(x, w, counts, b))
            out[b] = {"tflops": 2 * N * D * F / secs / 1e12, "speedup_vs_bf16": out["bf16_tflops"] * secs
                      / (2 * N * D * F / 1e12), "rel_error": ((y - ref).norm() / ref.norm()).item()}
        except Exception as e:  # noqa: BLE001 - one backend's failure is a finding, not the end of the check
            out[b] = {"error": f"{type(e).__name__}: {e}"}
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
    for r in list(out.values()):
        r["assignment_ratio"] = r["assignments"] / base["assignments"]
        r["time_ratio"] = r["seconds"] / base["seconds"]
        saved = 1 - r["assignment_ratio"]
        r["time_saved_over_assignments_saved"] = (1 - r["time_ratio"]) / saved if saved else None
    # ../shared/REFERENCE.md section 5b: Megatron-Core's MoE-layer baseline (H100, EP8, 4096 tokens per rank, top-2,
    # forced balance): 4.33 ms forward + 7.68 ms backward. Ours here: one GPU holding all 8 experts (no all-to-all).
    out["megatron_core_reference_ms"] = {"forward": 4.33, "backward": 7.68, "total": 12.01,
                                         "setting": "H100, EP8, 4096 tokens/rank, top-2 (a different layout)"}
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
    return {"tokens": T, "rows": T * K, "parameter_bytes": params, "measured_fwd_bwd_extra_bytes": peak_extra,
            "predicted_activation_bytes": predicted_acts, "predicted_backward_transient_bytes": predicted_bwd,
            "predicted_extra_bytes": predicted_acts + predicted_bwd,
            "ratio_predicted_over_measured": (predicted_acts + predicted_bwd) / peak_extra}


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


GPU_SHAPES = {"T": 4096, "D": 4096, "E": 8, "K": 2, "reps": 10, "T_memory": 2048, "heads": 48, "kv_heads": 8,
              "gemm_shapes": {"mixtral_8x7b": (4096, 14336), "mixtral_8x22b": (6144, 16384)}}
SMOKE_SHAPES = {"T": 64, "D": 32, "E": 4, "K": 2, "reps": 2, "T_memory": 32, "heads": 4, "kv_heads": 2,
                "gemm_shapes": {"mixtral_8x7b": (32, 64), "mixtral_8x22b": (48, 64)}}
SECTIONS = {"permute": check_permute, "grouped_gemm": check_grouped_gemm, "fp8": check_fp8,
            "null_layer": check_null_layer, "memory": check_memory, "deepep_indices": check_deepep_indices}


def run(cpu_smoke: bool, only: list[str] | None = None) -> dict:
    dev = torch.device("cpu" if cpu_smoke else "cuda")
    dtype = torch.float32 if cpu_smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if cpu_smoke else GPU_SHAPES
    gpu, clock = _gpu_figures(dev), Clock(dev)
    result = {"device": gpu, "torch": torch.__version__, "dtype": str(dtype), "cpu_smoke": cpu_smoke,
              "shapes": shapes}
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn(dev, dtype, shapes, clock, gpu)
        except Exception as e:  # noqa: BLE001 - record and go on: one JSON with every section's outcome
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        result[name + "_seconds"] = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json (or a .json path)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, torch parts only")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; this check needs one GPU (see ../shared/GPU.md), or pass "
              "--cpu-smoke for the tiny CPU run", file=sys.stderr)
        return 2
    result = run(args.cpu_smoke, args.only.split(",") if args.only else None)
    path = args.out if args.out.endswith(".json") else os.path.join(args.out, "gpu_check.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    errors = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    if errors:
        print(f"sections with errors: {errors}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
