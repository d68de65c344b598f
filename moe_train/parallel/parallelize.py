"""Applies expert + data parallelism to a plain model: expert sharding, all-to-all dispatchers, FSDP2.

parallelize_model(model, ctx), on every rank, with the same full model on every rank (same seed or checkpoint), or
with a model on the meta device (train/build.py: sharded first, then each rank materialises its own shards):
  1. each MoE layer keeps only its expert shard: experts [ep_rank*E_local, (ep_rank+1)*E_local) (E_local = E/ep) of
     every stacked per-expert tensor (base weights and LoRA adapters alike), recorded in ``experts.ep_shard`` (an
     ExpertShard), and gets an AllToAllDispatcher over the ep group (ep > 1);
  2. optional global aux loss: a forward hook on every router replaces plan.aux_loss by the loss computed from
     the per-expert counts summed over all ranks (the probabilities stay local);
  3. gradient reduction by FSDP2 ``fully_shard`` with two meshes (the torchtitan layout):
       experts of each layer   over the "dp" mesh dim (the expert-data-parallel group, ranks with the same shard)
       everything else          over all ranks (world_mesh): one unit per decoder block (its experts nested in
                                it), the embedding, norm + head, and the root (_apply_fsdp)
     Expert weights are sharded on dim 1 over the edp group (dim 0 is the ep split).
     Scale. The loss on each rank is the mean over its own tokens; the objective is the mean over ranks. A
     non-expert gradient is averaged over the world (FSDP's default). An expert weight's local gradient already
     SUMS the contributions of the ep ranks whose tokens it served (the all-to-all backward brings them home), so
     averaging it over the edp group alone would leave it ep times too large; its divide factor is therefore the
     world size: grad = (1/world) * sum over all ranks of d loss_r / dW, the same as for every other parameter.
     On gloo (no PREMUL_SUM) the expert reduction is a plain sum followed by the division.
     Precision: ``param_dtype=torch.bfloat16`` sets MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on every
     fully_shard call (torchtitan's mixed precision; the caller runs no autocast); None keeps the parameters' dtype.

Under FSDP2 every parameter is a DTensor shard; each element of every parameter lives on exactly one rank (non-
expert parameters: Shard(0) over the world; experts: Shard(0) over edp x disjoint over ep). The helpers for the
loop live beside this module: moe_train/parallel/collectives.py (all_reduce_sum / all_reduce_mean,
clip_grad_norm_) and moe_train/parallel/state.py (full_state_dict / full_grads for plain full tensors, and
checkpoint_view for sharded DCP checkpoints, moe_train/io/dcp_checkpoint.py, which resume at another world size).
Buffers (e.g. the aux-loss-free expert_bias) are not sharded: keep them identical on every rank by updating them
with counts summed over all ranks (all_reduce_sum).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_train.model.experts import ExpertShard, GroupedExperts
from moe_train.model.moe_layer import MoELayer
from moe_train.parallel.collectives import all_reduce
from moe_train.parallel.dispatcher import AllToAllDispatcher
from moe_train.parallel.distributed import ParallelContext, validate_layout
from moe_train.routing.balancing import load_balancing_loss, null_bucket_counts


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]



@torch.no_grad()
def _check_replicas_identical(model: nn.Module, ctx: ParallelContext) -> None:
    """FSDP2 keeps each rank's own slice of its own full tensor: the full models must agree before sharding."""
    s = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, p in enumerate(model.parameters()):
        s += (i + 1) * p.detach().to(torch.float64).sum()
    both = torch.stack([s, -s])
    all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[0], -both[1]):
        raise ValueError("the model's parameters differ across ranks before parallelize_model: build it with the "
                         "same seed (torch.manual_seed) or load the same checkpoint on every rank")


@torch.no_grad()
def shard_experts(experts: GroupedExperts, ep_rank: int, ep_size: int) -> None:
    """Keeps experts [ep_rank*E_local, (ep_rank+1)*E_local) (E_local = E/ep) of EVERY stacked per-expert tensor of
    the module (the base weights and e.g. LoRA adapters alike: GroupedExperts.stacked_parameters) as new parameters,
    and records the block in ``experts.ep_shard`` (parallel/state.py's gathers and checkpoint view read it)."""
    assert experts.ep_shard is None, "experts are already sharded"
    E = experts.num_experts
    assert E % ep_size == 0, (E, ep_size)  # validate_layout checked the config
    L = E // ep_size
    lo = ep_rank * L
    for name, p in experts.stacked_parameters():
        setattr(experts, name, nn.Parameter(p.detach()[lo:lo + L].clone(), requires_grad=p.requires_grad))
    experts.num_experts = L
    experts.ep_shard = ExpertShard(num_global=E, offset=lo)


def _global_aux_hook(ctx: ParallelContext):
    """Router forward hook: aux loss with f from the counts of ALL ranks (Megatron's global aux loss).

    With the per-rank losses averaged (as the gradient reduction does), mean_r N sum_i f_i^global P_i^(r) equals
    the loss of the global batch, so its gradients match a single process on the whole batch."""

    def hook(router: nn.Module, args, plan):
        probs_TN = plan.probs_TN
        if probs_TN is None:
            return plan
        E = plan.counts_E.numel()
        num_null = probs_TN.shape[-1] - E
        counts_E = plan.counts_E.to(torch.float64)
        # Every slot of the null router is a pick, true or null; only the total null count enters the loss
        # (null counts share one averaged bucket), so the total spread evenly is exact.
        null_total = plan.expert_idx_TK.numel() - counts_E.sum()
        counts_N = null_bucket_counts(counts_E, null_total, num_null)
        all_reduce(counts_N, op=dist.ReduceOp.SUM)
        plan.aux_loss = load_balancing_loss(probs_TN, counts_N, num_null=num_null)
        return plan

    return hook


def mixed_precision_policy(param_dtype: Optional[torch.dtype]):
    """FSDP2's policy for a compute dtype (torchtitan's): parameters all-gathered and computed in ``param_dtype``,
    gradients reduced in fp32, sharded masters and optimizer state in the parameters' own dtype (fp32). None (or
    float32): no policy, everything in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    if param_dtype != torch.bfloat16:
        # fp16 would also need loss scaling, which the trainer does not do
        raise ValueError(f"parallelize_model(param_dtype={param_dtype}): use torch.bfloat16, or None / torch.float32 "
                         "for full precision")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _apply_fsdp(model: nn.Module, ctx: ParallelContext, layers: list[MoELayer],
                param_dtype: Optional[torch.dtype] = None) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    edp_mesh = ctx.mesh["dp"]
    mp = mixed_precision_policy(param_dtype)  # the same policy on every unit: one compute dtype for the model
    for layer in layers:
        # Experts shard on dim 1 (D or F) over the edp mesh, not dim 0: dim 0 is already split over ep, and keeping
        # the two splits on different dims makes each expert weight an ordinary 2-D DTensor (Shard(1) over dp,
        # Shard(0) over ep; moe_train/io/dcp_checkpoint.py) that DCP saves and reshards; it also works with fewer local
        # experts than edp ranks (torchtitan does the same).
        fully_shard(layer.experts, mesh=edp_mesh, shard_placement_fn=lambda p: Shard(1), mp_policy=mp)
        layer.experts.set_gradient_divide_factor(float(ctx.world_size))  # see the module docstring: scale
        if ctx.backend == "gloo" and ctx.edp_size > 1:
            # gloo has no PREMUL_SUM: sum, then divide. (Not on a 1-rank mesh: torch 2.13 would divide twice there,
            # once in its no-communication copy and once more as the post-division.)
            layer.experts.set_force_sum_reduction_for_comms(True)
    # One unit per decoder block (torchtitan's): a rank holds one block's gathered parameters at a time, not the
    # whole model's. Every block but the last frees its gathered parameters after forward (gathered again for
    # backward); the last block's and the head's are used by backward at once, so they stay. The embedding and
    # norm + head are units of their own; a tied head shares the embedding's weight, so it stays in the root unit
    # with the embedding. FSDP2 prefetches the next unit's all-gather during the current unit's compute.
    blocks = list(getattr(model, "layers", []))
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=ctx.world_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if hasattr(model, "embed_tokens") and not tied:
        fully_shard(model.embed_tokens, mesh=ctx.world_mesh, mp_policy=mp)
        fully_shard([model.norm, model.lm_head], mesh=ctx.world_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=ctx.world_mesh, mp_policy=mp)


def parallelize_model(model: nn.Module, ctx: ParallelContext, param_dtype: Optional[torch.dtype] = None
                      ) -> nn.Module:
    """Expert shards + all-to-all dispatchers + FSDP2 gradient reduction (see the module docstring). In place;
    returns the model. ``param_dtype=torch.bfloat16``: bf16 mixed precision by FSDP2's MixedPrecisionPolicy (bf16
    all-gather and compute, fp32 gradient reduction, fp32 masters); run the forward WITHOUT torch.autocast then.
    None keeps the parameters' dtype. A single-process context returns the model unchanged (and the caller uses
    torch.autocast for bf16: there is no all-gather to cast)."""
    if not ctx.distributed:
        return model
    mixed_precision_policy(param_dtype)  # a bad dtype fails before any sharding
    layers = moe_layers(model)
    if not layers:
        raise ValueError("parallelize_model found no MoELayer in the model")
    num_experts = {layer.experts.num_experts for layer in layers}
    if len(num_experts) != 1:
        raise ValueError(f"MoE layers with different expert counts {sorted(num_experts)} are not supported")
    E = num_experts.pop()
    validate_layout(ctx.world_size, ctx.ep_size, E)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:  # a model built whole on every rank (tests, small jobs); train/build.py shards a meta model
        model.to(ctx.device)
        _check_replicas_identical(model, ctx)
    for layer in layers:
        if ctx.ep_size > 1:
            shard_experts(layer.experts, ctx.ep_rank, ctx.ep_size)
            layer.dispatcher = AllToAllDispatcher(ctx.ep_group, E, layer.dispatcher.permute_backend,
                                                  overlap_chunks=ctx.a2a_overlap_chunks)
        if ctx.global_aux_loss:
            layer.router.register_forward_hook(_global_aux_hook(ctx))
    _apply_fsdp(model, ctx, layers, param_dtype)
    return model
