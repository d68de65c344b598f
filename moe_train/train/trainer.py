"""The training loop: one function from a validated Config to a trained model, metrics and checkpoints.

Model, parallelism and loop stay separate (torchtitan): the model is built plain (or loaded, and converted to
AdaMoE when the config asks for null experts on a top-k checkpoint), LoRA and freezing are applied, then
``parallelize_model`` applies expert/data parallelism when the launch is distributed. The loop only sees a module
that maps input_ids to (logits, routing plans).

Per optimizer step: grad_accum_steps micro-batches (loss / accum each), NaN/inf guard (the step is skipped on every
rank and counted), clipping over all ranks' shards, AdamW, LR schedule, then the routing state updates that must be
identical on every rank (aux-loss-free expert bias from all-reduced counts; compute-budget bias from the
all-reduced true experts per token of each layer).
Shape legend: B sequences per micro-batch, S sequence length, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from moe_train.config import Config, to_dict
from moe_train.data import Data, build_data
from moe_train.eval.report import corpus_report, validation_metrics
from moe_train.io import load_any
from moe_train.io.dcp_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moe_train.io.model_file import load_model, save_model
from moe_train.model import MoETransformer, build_model
from moe_train.model.flops import flops_vs_topk, forward_flops_per_token
from moe_train.model.loss import lm_loss, routing_losses
from moe_train.parallel.distributed import ParallelContext, destroy_distributed, init_distributed
from moe_train.parallel.parallelize import all_reduce_mean, all_reduce_sum, clip_grad_norm_, full_state_dict
from moe_train.routing.capacity import load_imbalance
from moe_train.train.metrics import MetricsWriter

# MoE settings that are training choices, not architecture: always taken from the config, also with init_from.
MOE_TRAINING_KNOBS = ("aux_loss_coef", "z_loss_coef", "expert_bias_rate", "target_true_experts", "budget_kp",
                      "budget_ki", "capacity_factor", "drop_policy", "gemm_backend", "permute_backend")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses)."""


def lr_lambda(cfg: Config):
    t = cfg.train

    def f(step: int) -> float:  # step counts optimizer steps taken so far
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def bf16_compute(cfg: Config, device: torch.device) -> bool:
    """train.precision resolved: bf16 compute (fp32 master weights and optimizer state) or fp32."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def use_autocast(model: torch.nn.Module, cfg: Config, device: torch.device) -> bool:
    """bf16 autocast only for a model that FSDP2 does not wrap: a wrapped one computes in bf16 through its
    MixedPrecisionPolicy (parallelize_model(param_dtype=bf16)); autocast is for the unsharded model only (over FSDP
    it would all-gather fp32 and cast per op)."""
    from torch.distributed.fsdp import FSDPModule

    return bf16_compute(cfg, device) and not isinstance(model, FSDPModule)


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over TRAINABLE parameters only (frozen ones hold no state); no decay on 1-D tensors."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"train.trainable={t.trainable} matches no parameter: nothing would train")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2),
                             fused=device.type == "cuda")


def initial_model(cfg: Config) -> MoETransformer:
    """The model to train: fresh, or loaded from train.init_from (converted to AdaMoE if the config asks)."""
    src = cfg.train.init_from
    if src is None:
        return build_model(cfg.model)
    loaded = load_any(src)
    want, have = cfg.model.moe, loaded.config.moe
    if want.router == "null" and have.router == "topk":
        from moe_train.io.convert import add_null_experts

        add_null_experts(loaded, want.num_null_experts, want.top_k, want.baseline_top_k, want.null_tie_break)
    elif want.router != have.router:
        raise ValueError(f"model.moe.router={want.router!r} but train.init_from={src!r} holds a {have.router!r} "
                         "model; only top-k -> null (AdaMoE conversion) is done on load")
    knobs = {k: getattr(want, k) for k in MOE_TRAINING_KNOBS}
    model_cfg = dataclasses.replace(loaded.config, moe=dataclasses.replace(loaded.config.moe, **knobs))
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # new routing-state buffers (budget / expert bias switched on by the config) start at their initial values
    assert not unexpected and all(k.endswith(("expert_bias", "null_bias", "null_bias_integral")) for k in missing), \
        (missing, unexpected)
    return model


def apply_trainable(model: torch.nn.Module, cfg: Config) -> None:
    """LoRA (if configured), then freeze every parameter whose name matches none of train.trainable."""
    t = cfg.train
    if t.lora_rank:
        from moe_train.model.lora import apply_lora

        apply_lora(model, t.lora_rank, t.lora_alpha, tuple(t.lora_targets))
    if t.trainable:
        patterns = [re.compile(p) for p in t.trainable]
        for name, p in model.named_parameters():
            p.requires_grad_(any(pt.search(name) for pt in patterns))


def evaluate(model: torch.nn.Module, data: Data, cfg: Config, device: torch.device) -> dict:
    """Validation loss, true experts per token (overall, per layer, per difficulty label), FLOPs vs top-k, at the
    training precision, under the trainer's ``val_*`` names; {} without a held-out split (moe_train/eval/report.py)."""
    rep = corpus_report(model, data.val_batches(cfg.train.batch_size), device,
                        autocast=use_autocast(model, cfg, device))
    return validation_metrics(rep)


def train(cfg: Config, ctx: Optional[ParallelContext] = None) -> dict:
    """Trains as configured; returns the last step's metrics (plus validation figures). Without a ``ctx`` the
    process groups are created from the launch environment and torn down at the end."""
    if ctx is not None:
        return _train(cfg, ctx)
    ctx = init_distributed(cfg.parallel, cfg.model.moe.num_experts)
    try:
        return _train(cfg, ctx)
    finally:
        destroy_distributed(ctx)


class _RoutingAccumulator:
    """Per-layer counts, tokens and drops summed over the micro-batches of one step (reduced over ranks once).

    counts_LE: the rows that ran (after capacity), for load statistics and true experts per token;
    selected_LE: the router's selections before capacity drops, for the aux-loss-free expert bias."""

    def __init__(self):
        self.counts_LE = self.selected_LE = self.tokens_L = self.dropped_L = None

    def add(self, plans) -> None:
        counts = torch.stack([p.counts_E for p in plans]).to(torch.float64)
        selected = torch.stack([p.selected_counts_E for p in plans]).to(torch.float64)
        tokens = torch.tensor([float(p.num_tokens) for p in plans], dtype=torch.float64, device=counts.device)
        dropped = torch.stack([p.extras["capacity"]["num_dropped"].to(torch.float64) if "capacity" in p.extras
                               else counts.new_zeros(()) for p in plans])
        if self.counts_LE is None:
            self.counts_LE, self.selected_LE, self.tokens_L, self.dropped_L = counts, selected, tokens, dropped
        else:
            self.counts_LE, self.selected_LE, self.tokens_L, self.dropped_L = (
                self.counts_LE + counts, self.selected_LE + selected, self.tokens_L + tokens, self.dropped_L + dropped)

    def reduce(self, ctx: ParallelContext) -> dict:
        L, E = self.counts_LE.shape
        packed = all_reduce_sum(torch.cat([self.counts_LE.reshape(-1), self.selected_LE.reshape(-1), self.tokens_L,
                                           self.dropped_L]), ctx)  # one collective for all of it
        counts_LE, selected_LE = packed[:L * E].view(L, E), packed[L * E:2 * L * E].view(L, E)
        tokens, dropped = packed[2 * L * E:2 * L * E + L], packed[2 * L * E + L:]
        assigned = counts_LE.sum(1)
        imb = [load_imbalance(c, ctx.ep_size) for c in counts_LE]
        return {"counts_LE": counts_LE, "selected_counts_LE": selected_LE,
                "true_experts_per_layer": (assigned / tokens.clamp_min(1)).tolist(),
                "drop_rate": float(dropped.sum() / (assigned + dropped).sum().clamp_min(1)),
                "expert_imbalance": max(float(i["expert_max_over_mean"]) for i in imb),
                "rank_imbalance": max(float(i["rank_max_over_mean"]) for i in imb)}


def update_routing_state(routers, stats: dict, budget: bool) -> None:
    """After an optimizer step, from ``_RoutingAccumulator.reduce`` (all ranks' sums: the same state everywhere):
    the aux-loss-free expert bias from the PRE-drop selections (post-drop counts cap an overloaded expert at the
    capacity, which can equal the mean and hide the overload), the compute budget from the true experts per token
    that actually ran."""
    for router, selected_E, k_mean in zip(routers, stats["selected_counts_LE"], stats["true_experts_per_layer"]):
        if getattr(router, "expert_bias", None) is not None:
            router.update_bias(selected_E)
        if budget:
            router.update_budget(k_mean)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)


def _tensorboard(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: no event files (pip install tensorboard, or train.tensorboard: false)")
        return None
    return SummaryWriter(str(out_dir / "tb"))


def _train(cfg: Config, ctx: ParallelContext) -> dict:
    t = cfg.train
    micro_rows = t.batch_size // ctx.dp_size
    if t.batch_size % ctx.dp_size or micro_rows % t.grad_accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by data-parallel size {ctx.dp_size} x "
                         f"train.grad_accum_steps={t.grad_accum_steps}")
    torch.manual_seed(t.seed)
    model = initial_model(cfg)
    cfg = dataclasses.replace(cfg, model=model.config)  # a checkpoint or HF folder brings its own architecture
    if t.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    data = build_data(cfg, cfg.model.vocab_size, ctx.dp_rank, ctx.dp_size)
    apply_trainable(model, cfg)
    model.activation_checkpointing = t.activation_checkpointing
    model = model.to(ctx.device)
    if ctx.distributed:
        from moe_train.parallel.parallelize import parallelize_model

        # bf16: FSDP2's MixedPrecisionPolicy (bf16 all-gather and compute, fp32 gradient reduction), as torchtitan
        model = parallelize_model(model, ctx, param_dtype=torch.bfloat16 if bf16_compute(cfg, ctx.device) else None)
    autocast = use_autocast(model, cfg, ctx.device)  # single process: torch.autocast over the fp32 model
    opt = build_optimizer(model, cfg, ctx.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    out_dir = Path(t.out_dir)
    start_step, bad_steps = 0, 0
    resume_path = Path(t.resume_from) if t.resume_from else (latest_checkpoint(out_dir) if t.resume else None)
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, opt, ctx)
        sched.load_state_dict(state["scheduler"])
        data.train.load_state_dict(state["data"])
        start_step, bad_steps = state["step"], state["bad_steps"]
        if ctx.is_main:
            print(f"resumed from {resume_path} at step {start_step}", flush=True)
    metrics = MetricsWriter(out_dir, enabled=ctx.is_main, resume_step=start_step)
    tb = _tensorboard(out_dir, t.tensorboard and ctx.is_main)
    if ctx.is_main:
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    routers = [layer.moe.router for layer in model.layers]
    budget = cfg.model.moe.target_true_experts is not None
    record: dict = {}
    t0 = time.perf_counter()
    model.train()

    def checkpoint(step_done: int) -> None:
        save_checkpoint(out_dir, step_done, model, opt, {"scheduler": sched.state_dict(),
                        "data": data.train.state_dict(), "bad_steps": bad_steps}, ctx, t.keep_last)

    for step in range(start_step, t.steps):
        start = time.perf_counter()
        inputs_all, targets_all = data.train.next_batch()
        acc = _RoutingAccumulator()
        sums = torch.zeros(4, device=ctx.device)  # loss, lm, aux, z (means over micro-batches)
        opt.zero_grad(set_to_none=True)
        for inputs, targets in zip(inputs_all.chunk(t.grad_accum_steps), targets_all.chunk(t.grad_accum_steps)):
            # fp32 master weights and optimizer state either way; routers' softmax and the LM loss stay in fp32
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits, plans = model(inputs.to(ctx.device), return_plans=True)
            lm = lm_loss(logits, targets.to(ctx.device))
            terms = routing_losses(plans, cfg.model.moe)
            loss = lm + terms["aux_loss"] + terms["z_loss"]
            (loss / t.grad_accum_steps).backward()
            sums += torch.stack([loss, lm, terms["aux_loss"], terms["z_loss"]]).detach().float() / t.grad_accum_steps
            acc.add(plans)
        scalars = all_reduce_mean(sums, ctx).tolist()  # every rank sees the same values: one skip decision
        if not math.isfinite(scalars[0]):
            bad_steps += 1
            opt.zero_grad(set_to_none=True)
            if ctx.is_main:
                print(f"step {step + 1}: non-finite loss {scalars[0]}, step skipped ({bad_steps}/{t.max_bad_steps})",
                      flush=True)
            metrics.write({"step": step + 1, "skipped": True, "loss": scalars[0], "bad_steps": bad_steps})
            if bad_steps > t.max_bad_steps:
                raise TrainingError(f"{bad_steps} non-finite losses (train.max_bad_steps={t.max_bad_steps}): "
                                    "lower train.lr, check the data, or raise the limit")
            sched.step()
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
                checkpoint(step + 1)
            continue
        # the global norm over every rank's gradient shards (torch's own clip_grad_norm_ in a single process)
        grad_norm = clip_grad_norm_(model.parameters(), t.grad_clip, ctx) if t.grad_clip > 0 else None
        opt.step()
        sched.step()
        stats = acc.reduce(ctx)
        per_layer = stats["true_experts_per_layer"]
        update_routing_state(routers, stats, budget)
        elapsed = time.perf_counter() - start
        tokens = inputs_all.numel() * ctx.dp_size
        step_flops = 3 * forward_flops_per_token(cfg.model, per_layer, t.seq_len) * tokens
        record = {
            "step": step + 1,
            "loss": scalars[0], "lm_loss": scalars[1], "aux_loss": scalars[2], "z_loss": scalars[3],
            "true_experts_per_token": sum(per_layer) / len(per_layer),
            "true_experts_per_layer": per_layer,
            "flops_vs_topk": flops_vs_topk(cfg.model, per_layer, t.seq_len),
            "tokens_per_s": tokens / elapsed,
            "tflops_per_device": step_flops / elapsed / ctx.world_size / 1e12,
            "lr": sched.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "drop_rate": stats["drop_rate"],
            "expert_imbalance": stats["expert_imbalance"],
            "rank_imbalance": stats["rank_imbalance"],
            "peak_memory_mb": _peak_memory_mb(ctx.device),
            "bad_steps": bad_steps,
        }
        if t.peak_tflops:
            record["mfu"] = record["tflops_per_device"] / t.peak_tflops
        if budget:
            record["null_bias_per_layer"] = [float(r.null_bias) for r in routers]
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
            record.update(evaluate(model, data, cfg, ctx.device))
        metrics.write(record)
        if tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    tb.add_scalar(key, value, step + 1)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < t.steps:
            checkpoint(step + 1)
        if ctx.is_main and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
            done = step + 1
            eta = (time.perf_counter() - t0) / (done - start_step) * (t.steps - done)
            bar = "#" * int(20 * done / t.steps)
            print(f"[{bar:<20}] step {done}/{t.steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f} "
                  f"experts/token {record['true_experts_per_token']:.2f} flops/topk {record['flops_vs_topk']:.3f} "
                  f"tok/s {record['tokens_per_s']:.0f} eta {eta:.0f}s", flush=True)
    if start_step < t.steps:
        checkpoint(t.steps)
    final = evaluate(model, data, cfg, ctx.device)
    record.update(final)
    if final and ctx.is_main:
        metrics.write({"step": t.steps, **final})
        print(f"validation loss {final['val_loss']:.4f} true experts/token {final['val_true_experts_per_token']:.2f}"
              f" flops/topk {final['val_flops_vs_topk']:.3f}", flush=True)
        if "val_true_experts_by_label" in final:
            print("true experts by difficulty: " + ", ".join(
                f"{k} {v:.2f}" for k, v in final["val_true_experts_by_label"].items()), flush=True)
    if tb is not None:
        tb.close()
    state = full_state_dict(model, ctx) if ctx.distributed else model.state_dict()  # collective when distributed
    if ctx.is_main:
        if t.lora_rank:
            from moe_train.model.lora import merge_lora_state_dict

            state = merge_lora_state_dict(state, t.lora_alpha)  # the final model is a plain model
        save_model(model, out_dir / "final" / "model.pt", step=t.steps, state_dict=state)
        print(f"saved {out_dir / 'final' / 'model.pt'}", flush=True)
        if t.export_hf:
            export_hf(out_dir / "final" / "model.pt", out_dir / "hf")
            print(f"exported {out_dir / 'hf'}", flush=True)
    return record


def export_hf(model_path: Path, hf_dir: Path) -> None:
    """The final model as a Hugging Face folder."""
    from moe_train.io.hf import to_hf

    to_hf(load_model(model_path), hf_dir)
