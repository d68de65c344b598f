"""The training loop: one function from a validated Config to a trained model, metrics and a final checkpoint.

Model, parallelism and loop stay separate (torchtitan): the model is built plain, ``parallelize_model`` applies
expert/data parallelism to it when the launch is distributed, and this loop only sees a module that maps
input_ids to (logits, routing plans).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from moe_train.config import Config, to_dict
from moe_train.eval.flops import flops_vs_topk
from moe_train.model import MoETransformer, build_model
from moe_train.model.loss import lm_loss, routing_losses
from moe_train.parallel.distributed import ParallelContext, destroy_distributed, init_distributed
from moe_train.parallel.parallelize import all_reduce_mean, all_reduce_sum, clip_grad_norm_, full_state_dict
from moe_train.train.checkpoint import load_model, save_model
from moe_train.train.metrics import MetricsWriter
from moe_train.train.synthetic import SyntheticData


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


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on norms, biases and 1-D tensors."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def initial_model(cfg: Config) -> MoETransformer:
    src = cfg.train.init_from
    if src is None:
        return build_model(cfg.model)
    path = Path(src)
    if path.is_dir():
        from moe_train.io.hf import from_hf

        return from_hf(path)
    return load_model(path)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SyntheticData, batch_size: int, device: torch.device) -> dict:
    """Validation loss and mean true experts per token (over layers) on the held-out split."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, experts_sum = 0.0, 0, 0.0
    for inputs, targets, _ in data.val_batches(batch_size):
        logits, plans = model(inputs.to(device), return_plans=True)
        n = targets.numel()
        loss_sum += lm_loss(logits, targets.to(device)).item() * n
        experts_sum += sum(p.true_experts_per_token_T.sum().item() for p in plans) / len(plans)
        tokens += n
    model.train(was_training)
    return {"val_loss": loss_sum / max(tokens, 1), "val_true_experts_per_token": experts_sum / max(tokens, 1)}


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


def _train(cfg: Config, ctx: ParallelContext) -> dict:
    t = cfg.train
    if t.batch_size % ctx.dp_size:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the data-parallel size {ctx.dp_size}")
    torch.manual_seed(t.seed)
    model = initial_model(cfg)
    cfg.model = model.config  # a checkpoint or HF folder brings its own architecture
    model = model.to(ctx.device)
    if ctx.distributed:
        from moe_train.parallel.parallelize import parallelize_model

        model = parallelize_model(model, ctx)
    data = SyntheticData(cfg.data.num_sequences, cfg.data.val_sequences, t.seq_len, cfg.model.vocab_size,
                         cfg.data.seed)
    opt = build_optimizer(model, cfg, ctx.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    out_dir = Path(t.out_dir)
    metrics = MetricsWriter(out_dir, enabled=ctx.is_main)
    if ctx.is_main:
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    routers = [layer.moe.router for layer in model.layers]
    record: dict = {}
    model.train()
    for step in range(t.steps):
        start = time.perf_counter()
        inputs, targets = data.batch(step, t.batch_size, ctx.dp_rank, ctx.dp_size)
        inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
        logits, plans = model(inputs, return_plans=True)
        lm = lm_loss(logits, targets)
        terms = routing_losses(plans, cfg.model.moe)
        loss = lm + terms["aux_loss"] + terms["z_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The global norm over every rank's gradient shards (torch's own clip_grad_norm_ in a single process).
        grad_norm = clip_grad_norm_(model.parameters(), t.grad_clip, ctx) if t.grad_clip > 0 else None
        opt.step()
        sched.step()
        for router, plan in zip(routers, plans):
            if getattr(router, "expert_bias", None) is not None:  # counts of all ranks: the same bias everywhere
                router.update_bias(all_reduce_sum(plan.counts_E, ctx))
        # Logged figures are means over the ranks (equal token counts per rank: the global-batch means).
        per_layer_L = torch.stack([p.true_experts_per_token_T.mean() for p in plans])
        scalars = all_reduce_mean(torch.cat([torch.stack([loss, lm, terms["aux_loss"], terms["z_loss"]]).detach()
                                             .float(), per_layer_L]), ctx).tolist()
        per_layer = scalars[4:]
        elapsed = time.perf_counter() - start
        record = {
            "step": step + 1,
            "loss": scalars[0],
            "lm_loss": scalars[1],
            "aux_loss": scalars[2],
            "z_loss": scalars[3],
            "true_experts_per_token": sum(per_layer) / len(per_layer),
            "true_experts_per_layer": per_layer,
            "flops_vs_topk": flops_vs_topk(cfg.model, per_layer, t.seq_len),
            "tokens_per_s": inputs.numel() * ctx.dp_size / elapsed,
            "lr": sched.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else grad_norm.item(),
        }
        metrics.write(record)
        if ctx.is_main and ((step + 1) % t.log_every == 0 or step + 1 == t.steps):
            print(f"step {step + 1}/{t.steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f} "
                  f"experts/token {record['true_experts_per_token']:.2f} flops/topk {record['flops_vs_topk']:.3f} "
                  f"tok/s {record['tokens_per_s']:.0f}", flush=True)
    if cfg.data.val_sequences:
        record.update(evaluate(model, data, t.batch_size, ctx.device))
        if ctx.is_main:
            print(f"validation loss {record['val_loss']:.4f} true experts/token "
                  f"{record['val_true_experts_per_token']:.2f}", flush=True)
    state = full_state_dict(model, ctx) if ctx.distributed else None  # collective: gathers every shard
    if ctx.is_main:
        save_model(model, out_dir / "final" / "model.pt", step=t.steps, state_dict=state)
        print(f"saved {out_dir / 'final' / 'model.pt'}", flush=True)
    return record
