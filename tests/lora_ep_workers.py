"""Rank-side code of tests/test_lora_ep.py: LoRA on the stacked experts under expert parallelism (gloo, CPU, 1
thread per rank), spawned with tests/ep_workers.py's helpers. Each function returns plain numbers (max errors,
shapes) that the pytest side asserts on. References are single-process and computed inside each rank from the same
seeds: the full model on the global batch (every rank's micro-batch concatenated).
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.distributed as dist

import ep_workers as W

TRAINABLE = (r"router\.", "lora_")
LR = 1e-2
STEPS = 2


def _err(a, b) -> float:
    """Max abs difference; inf when one side is missing or the shapes differ (e.g. an unsharded adapter)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if a.shape != b.shape:
        return math.inf
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def lora_model(rank: int, alpha: float = 8.0):
    """W's tiny null-expert model (E = 4) with LoRA on attention and experts, every B matrix NONZERO random (a
    fresh adapter is zero and would hide a wrong expert <-> adapter pairing), routers + adapters trainable."""
    from moe_train.model import build_model
    from moe_train.model.lora import apply_lora

    torch.manual_seed(0)
    model = build_model(W.tiny_model_config())
    apply_lora(model, rank, alpha, ("attention", "experts"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_B"):  # lora_B (attention), lora_{gate,up,down}_B [E, r, out] (experts)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            p.requires_grad_(any(re.search(pt, name) for pt in TRAINABLE))
    return model


def _train_steps(model, inputs, targets, moe_cfg, ctx=None):
    """STEPS AdamW steps on one batch; returns (loss per step, full grads of the first step, the final state).
    With a ctx: the rank's losses averaged over ranks, gathered full gradients and state."""
    from moe_train.model.loss import lm_loss, routing_losses
    from moe_train.parallel.state import full_grads, full_state_dict

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    losses, grads = [], None
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        logits, plans = model(inputs, return_plans=True)
        loss = lm_loss(logits, targets) + routing_losses(plans, moe_cfg)["aux_loss"]
        loss.backward()
        mean = loss.detach().clone()
        if ctx is not None:
            dist.all_reduce(mean)
            mean /= ctx.world_size
        losses.append(mean.item())
        if step == 0:
            grads = full_grads(model, ctx) if ctx is not None else {
                n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    state = full_state_dict(model, ctx) if ctx is not None else {k: v.detach() for k, v in
                                                                  model.state_dict().items()}
    return losses, grads, state


def lora_model_checks(ctx, lora_rank: int) -> dict:
    """The parallelized LoRA model (ep shards, FSDP2, the context's global aux loss) against one process on the
    global batch: per-step losses, every full gradient of a trainable parameter, the gathered state after STEPS
    AdamW steps."""
    from moe_train.model.lora import LoRAGroupedExperts
    from moe_train.parallel.parallelize import parallelize_model

    assert ctx.global_aux_loss, "the single-process objective needs the global aux loss"
    mcfg = W.tiny_model_config()
    inputs, targets = W._global_batch(ctx.world_size)
    ref = lora_model(lora_rank)
    model = copy.deepcopy(ref)
    ref_losses, ref_grads, ref_state = _train_steps(ref, inputs, targets, mcfg.moe)

    model = parallelize_model(model, ctx)
    per = inputs.shape[0] // ctx.world_size
    sl = slice(ctx.rank * per, (ctx.rank + 1) * per)
    losses, grads, state = _train_steps(model, inputs[sl], targets[sl], mcfg.moe, ctx)
    trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
    experts = model.layers[0].moe.experts
    assert isinstance(experts, LoRAGroupedExperts)
    return {
        "ep_rank": ctx.ep_rank,
        "loss_err": [abs(a - b) for a, b in zip(losses, ref_losses)],
        "grad_err": {n: _err(grads[n], ref_grads[n]) for n in trainable},
        "grad_scale": {n: ref_grads[n].abs().max().item() for n in trainable},
        "state_err": {k: _err(state.get(k), v) for k, v in ref_state.items()},
        "state_keys_equal": list(state) == list(ref_state),
        # the rank's own expert block, every stacked tensor alike: [E / ep, ...]
        "local_experts": {n: p.to_local().shape[0] if hasattr(p, "to_local") else p.shape[0]
                          for n, p in experts.named_parameters(recurse=False)},
        "num_trainable_expert_tensors": sum(1 for n in trainable if ".experts.lora_" in n),
    }


def model_suite(ep: int, lora_rank: int) -> dict:
    ctx = W._ctx(ep, W.tiny_model_config().moe.num_experts, global_aux_loss=True)
    return {"model": lora_model_checks(ctx, lora_rank)}


def model_and_train_suite(lora_rank: int, config_path: str, runs: list[tuple[str, list[str]]]) -> dict:
    """One spawn, several checks: the model check, then the trainer (train(cfg, ctx)) once per (name, overrides) in
    ``runs``, all in one process group laid out by the first run's parallel config."""
    from moe_train.config import load_config
    from moe_train.parallel.distributed import destroy_distributed, init_distributed
    from moe_train.train.trainer import train

    cfgs = [(name, load_config(config_path, overrides)) for name, overrides in runs]
    ctx = init_distributed(cfgs[0][1].parallel, cfgs[0][1].model.moe.num_experts)
    try:
        out = {"model": lora_model_checks(ctx, lora_rank)}
        out["train"] = {name: train(cfg, ctx) for name, cfg in cfgs}
        return out
    finally:
        destroy_distributed(ctx)
