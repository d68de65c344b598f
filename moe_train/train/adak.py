"""Ada-K training (arXiv 2410.10456): allocator warm start, then PPO, on a frozen MoE model.

Frozen base: every base parameter (gates included) has requires_grad False and the optimizer holds only the
per-layer allocators W_p [A, D]. Because no base tensor needs a gradient, a forward with gradients enabled only
records the allocators' small graphs (the hidden states never require grad).

Precision (adak.dtype): the base may be bf16 (it does not train); the allocators are always fp32 master weights
(freeze_base upcasts them, load_adak_model never rounds them), so the AdamW state is fp32 and small updates such as
the paper's weight decay (lr 1e-3 x 0.1 = 1e-4 relative, below bf16's 2^-8 resolution) are not lost. The allocator
computes in fp32 on the upcast hidden state (moe_train/routing/adak.py); checkpoints store the fp32 allocators
beside the bf16 base and load back either way.

Warm start (paper Table 11 "Threshold p 0.3"; this reading is unverified, see REFERENCE.md section 2):
    the model runs with every layer forced to the base top-k (the base model's own hidden states); at each layer
    k*_t = the smallest k whose cumulative sorted frozen-router probability reaches p, clipped to [k_min, k_max];
    loss = mean over layers of CE(softmax(x_t W_p), k*_t - k_min).
    The forward runs with gradients enabled (only the allocators record a graph) and the cross-entropy is taken
    from the allocator log-probs that each router returns in its plan, so under FSDP2 the backward goes through the
    parameters FSDP gathered and its hooks reduce the gradient into the sharded allocators.

PPO, one step per batch:
    rollout   (no grad) every allocator samples a_{l,t} ~ pi_l(. | x_{l,t}); k_{l,t} = k_min + a_{l,t}, by inverse
              CDF from uniforms u_{l,g} drawn for the whole global batch (g = global token position) from one
              generator seeded with train.seed, the same on every rank; each rank takes its own columns. The
              actions are therefore a function of (seed, step, global position): 1 process and N ranks sample the
              same actions for the same global batch (up to float rounding of pi near a CDF boundary).
    reward    r_t = log P(x_{t+1} | x_<=t) under the adapted model - penalty * sum_l k_{l,t}
              (k = true experts actually used; lambda = penalty, 3e-3 in the paper; over a null router, e.g.
              LongCat-Flash's identity experts, the allocator's k counts picks and the penalty its FFN picks only)
    credit    every layer's action at position t gets token t's reward: A_{l,t} = A_t. The action also changes
              later positions through attention; that effect is not credited (a per-token bandit reading of the
              paper's per-token reward).
    baseline  A_t = r_t - b: b = r_t of the greedy (argmax-k) policy on the same batch ("greedy", default: a
              self-critical per-token baseline, one extra forward) | batch mean | running mean over steps | 0.
              The paper does not say which it uses; on the tiny demo the batch mean's variance was too high
              (docs/adak.md). normalize_advantages divides A by the population standard deviation of A over the
              batch (+ 1e-8) without re-centring it, so the baseline keeps its meaning.
    update    ppo_epochs passes over the stored actions; each pass re-runs the model with every allocator in
              "forced" mode (the stored actions, so the same hidden states) to get log pi_new(a | x), and takes
              ppo_minibatches AdamW steps, one per minibatch, on
                  L = -mean_{l,t} min(rho A, clip(rho, 1 - eps, 1 + eps) A) - entropy_coef * mean H,
                  rho = exp(log pi_new - log pi_old),  means over the minibatch's GLOBAL (layer, token) actions.
              A minibatch is a set of GLOBAL sequences: each pass draws one permutation of the global batch from
              the same generator and cuts it into ppo_minibatches parts (torch.chunk: fewer when the batch is
              smaller), so the partition does not depend on the world size. Each rank computes its part of every
              minibatch (the members in its own contiguous slice) as its local sum divided by the minibatch's
              global action count, times the world size (FSDP2 averages the allocator gradients over all ranks),
              so the reduced gradient is the single process's. A rank holding none of a minibatch still runs the
              forward and backward on an empty [0, S] batch (the all-to-all and FSDP's reduce-scatter are
              collectives) and adds 0.
              Rollouts (no grad) run in chunks of ceil(global B / ppo_minibatches) of the rank's own sequences:
              memory per forward as in one process, the same number of forwards on every rank, the same result.
Distributed (torchrun, parallel.ep): parallelize_model shards the frozen experts and dispatches with all-to-all;
the allocator decides k before dispatch, so a token sends only its k rows. Batch statistics (means, the advantage
std, metrics) are over the global batch; allocator gradients are averaged over all ranks (FSDP2). With equal
shares per rank (data/packing.py) a warm start or PPO run on N ranks equals the single process on the global batch,
for any ppo_minibatches (tested to 1e-5 in fp32, including minibatches of which some ranks hold nothing,
tests/test_adak_distributed.py).
Metrics per step (metrics.jsonl): reward, log-likelihood, mean k overall / per layer, flops_vs_topk (whole model),
expert_flops_vs_topk (mean k / base k), and, as the mean over the step's minibatches of global minibatch means,
policy loss, clip fraction, approx KL (mean (rho - 1) - log rho), entropy.
Shape legend: B sequences, S sequence length, T = B*S tokens, L MoE layers, A allocator actions, V vocab.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import AdaKConfig, Config, TrainConfig
from moe_train.data import get_corpus
from moe_train.eval.report import corpus_report
from moe_train.io.dcp_checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from moe_train.io.lock import OutDirLock
from moe_train.io.model_file import ModelFileReader
from moe_train.io.safetensors_folder import stored_dtype
from moe_train.model import MoETransformer
from moe_train.model.flops import flops_vs_topk
from moe_train.model.trainable import adak_routers, allocators_to_fp32, freeze_base  # noqa: F401
from moe_train.parallel.collectives import all_reduce_mean, all_reduce_sum
from moe_train.parallel.distributed import ParallelContext, distributed
from moe_train.routing.adak import AdaKRouter, routing_mode
from moe_train.train.build import build_job_model
from moe_train.train.engine import TorchEngine
from moe_train.train.fingerprint import MAY_CHANGE, check_resume, config_record
from moe_train.train.metrics import logger
from moe_train.train.preemption import Preempted, handles_stop_signals, rank_log
from moe_train.train.trainer import Trainer, TrainingError

# The console lines' abbreviations, printed once before each stage's first line (the step lines stay short).
WARM_START_LEGEND = ("warm start legend: ce = allocator cross-entropy against the threshold labels k*, label k = mean "
                     "k* (the frozen router's experts to reach the threshold), acc = share of tokens whose most "
                     "probable allocator action is k*")
PPO_LEGEND = ("ppo legend: reward = log-likelihood - penalty x true experts summed over layers, loglik = mean token log-likelihood, "
              "k = mean true experts per token per layer, flops/topk = whole-model FLOPs vs the base top-k, "
              "kl = approx. KL(old || new policy), clip = share of clipped ratios, H = policy entropy (nats)")

# What an Ada-K resume may change (train/fingerprint.py): the trainer's list, except that Ada-K reads the adak
# section (its math: refused, but for the PPO step count, which extends or shortens the run, and the validation
# cadence) and trains with train.beta1/beta2 (restored from the checkpoint's optimizer state, so refused too).
ADAK_MAY_CHANGE = tuple(p for p in MAY_CHANGE if p not in ("adak.*", "train.beta1", "train.beta2")) + (
    "adak.ppo_steps", "adak.val_every")
STAGES = ("warm_start", "ppo")  # in run order

# ----------------------------------------------------------------------------------------------------------
# model preparation


def global_mean(x: torch.Tensor, ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """Mean over every element on every rank (the local mean in one process)."""
    if ctx is None or not ctx.distributed:
        return x.mean()
    s = all_reduce_sum(torch.stack([x.detach().double().sum(), x.new_tensor(x.numel(), dtype=torch.float64)]), ctx)
    return (s[0] / s[1]).to(x.dtype)


def build_allocator_optimizer(params: Sequence[nn.Parameter], a: AdaKConfig, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the allocator weights only (paper: lr 1e-3 constant, weight decay 0.1)."""
    return torch.optim.AdamW(list(params), lr=a.lr, weight_decay=a.weight_decay, betas=(t.beta1, t.beta2))


def load_adak_model(cfg: Config, ctx: Optional[ParallelContext] = None) -> MoETransformer:
    """The base model of ``train.init_from``, converted to Ada-K with adak.k_min / adak.k_max when it is top-k or
    null, the base frozen in adak.dtype and the allocators fp32 masters; each rank of ``ctx`` materialises only its
    shards (train/build.py; None: the whole model in one process)."""
    return build_job_model(cfg, ctx, adak=True, base_dtype=adak_base_dtype(cfg))


def adak_base_dtype(cfg: Config) -> torch.dtype:
    """adak.dtype resolved: "stored" is the dtype the base checkpoint was saved in."""
    if cfg.adak.dtype != "stored":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.adak.dtype]
    src = Path(cfg.train.init_from) if cfg.train.init_from else None
    if src is not None and src.is_dir():
        return stored_dtype(src)
    if src is not None and src.is_file():
        return ModelFileReader(src).specs["embed_tokens.weight"][1]
    return torch.float32


def forced_k_actions(routers: Sequence[AdaKRouter], k: int, num_tokens: int,
                     device: torch.device) -> list[torch.Tensor]:
    """Per layer, the actions that give every token k experts (clipped to the layer's action range), for
    ``routing_mode(routers, "forced", actions)``."""
    return [torch.full((num_tokens,), min(max(k, r.k_min), r.k_max) - r.k_min, dtype=torch.long, device=device)
            for r in routers]


# ----------------------------------------------------------------------------------------------------------
# warm start


def warm_start_labels(probs_TE: torch.Tensor, threshold: float, k_min: int, k_max: int) -> torch.Tensor:
    """k*_t: the smallest k with sum of the k largest probabilities >= threshold, clipped to [k_min, k_max]."""
    sorted_TE = probs_TE.sort(dim=-1, descending=True).values
    cum_TE = sorted_TE.cumsum(dim=-1)
    k_T = (cum_TE < threshold).sum(dim=-1) + 1  # cum is increasing: the entries below p come first
    return k_T.clamp(min=k_min, max=k_max)


def warm_start_loss(model: MoETransformer, inputs_BS: torch.Tensor, threshold: float,
                    forward=None) -> tuple[torch.Tensor, dict]:
    """Mean over layers of the allocator cross-entropy on the pseudo labels, with the base top-k forward.

    The forward runs with gradients enabled and the loss comes from the allocator log-probs in the returned plans:
    under FSDP2 that is the only way the gradient reaches the sharded allocators (a loss built on the side, e.g. in
    a hook of a no-grad forward, leaves it on FSDP's unsharded copies, where the next backward would pick it up).
    Only the allocators record a graph: no base tensor requires grad. ``forward``: the engine's module call (default:
    the model)."""
    routers = adak_routers(model)
    base_k = forced_k_actions(routers, model.config.moe.top_k, inputs_BS.numel(), inputs_BS.device)
    with routing_mode(routers, "forced", base_k), torch.enable_grad():
        _, plans = (model if forward is None else forward)(inputs_BS, return_plans=True)
    losses, label_k, agree = [], [], []
    for router, plan in zip(routers, plans):
        log_pi_TA = plan.extras["allocator_log_probs_TA"]
        target_T = warm_start_labels(plan.probs_TN.detach(), threshold, router.k_min, router.k_max) - router.k_min
        losses.append(F.nll_loss(log_pi_TA, target_T))  # = cross-entropy of the allocator logits
        label_k.append((target_T + router.k_min).float().mean())
        agree.append((log_pi_TA.detach().argmax(-1) == target_T).float().mean())
    loss = torch.stack(losses).mean()
    return loss, {"label_k": torch.stack(label_k).mean().item(), "label_k_per_layer": [x.item() for x in label_k],
                  "label_acc": torch.stack(agree).mean().item()}


# ----------------------------------------------------------------------------------------------------------
# PPO pieces (pure functions; tested against hand computations)


def token_rewards(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, k_LT: torch.Tensor,
                  penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward_T, loglik_T): r_t = log P(target_t) - penalty * sum_l k_{l,t}."""
    logp_TV = torch.log_softmax(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), dim=-1)
    loglik_T = logp_TV.gather(-1, targets_BS.reshape(-1, 1)).squeeze(-1)
    return loglik_T - penalty * k_LT.float().sum(dim=0), loglik_T


class RewardBaseline:
    """b for A = r - b: 'batch_mean', 'running_mean' (EMA of past batch means; the first batch uses its own mean),
    'greedy' (the greedy policy's per-token reward, passed in), 'none'."""

    def __init__(self, kind: str, decay: float = 0.9):
        self.kind, self.decay = kind, decay
        self.value: Optional[float] = None

    def __call__(self, reward_T: torch.Tensor, greedy_reward_T: Optional[torch.Tensor] = None,
                 ctx: Optional[ParallelContext] = None):
        """The baseline for this batch; means are over the global batch (every rank) when distributed."""
        if self.kind == "batch_mean":
            return global_mean(reward_T, ctx)
        if self.kind == "none":
            return torch.zeros((), dtype=reward_T.dtype, device=reward_T.device)
        if self.kind == "greedy":
            assert greedy_reward_T is not None and greedy_reward_T.shape == reward_T.shape
            return greedy_reward_T
        assert self.kind == "running_mean", self.kind
        mean = global_mean(reward_T, ctx).item()
        b = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return torch.tensor(b, dtype=reward_T.dtype, device=reward_T.device)


def compute_advantages(reward_T: torch.Tensor, baseline, normalize: bool, eps: float = 1e-8,
                       ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """A = r - b, divided by the (global-batch, population) standard deviation of A when ``normalize``."""
    adv_T = reward_T - baseline
    if normalize:
        centred = adv_T - global_mean(adv_T, ctx)
        adv_T = adv_T / (global_mean(centred * centred, ctx).sqrt() + eps)
    return adv_T


def ppo_objective(new_log_prob_LT: torch.Tensor, old_log_prob_LT: torch.Tensor, adv_T: torch.Tensor,
                  clip_eps: float, entropy_LT: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                  num_actions: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """Clipped-ratio PPO loss (to minimise) over every (layer, token) action; A_t broadcast over layers.

    The loss and the statistics are sums over the given actions divided by ``num_actions`` (default: their count,
    i.e. means); ppo_step passes the action count of the whole GLOBAL minibatch, of which these are one rank's
    part. stats["sums"] holds the float64 sums (surrogate, entropy, clipped count, approx KL) to add over ranks."""
    log_ratio = new_log_prob_LT - old_log_prob_LT
    ratio = log_ratio.exp()
    adv = adv_T[None, :].expand_as(ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    n = ratio.numel() if num_actions is None else num_actions
    loss = -surrogate.sum() / n
    entropy_sum = entropy_LT.sum() if entropy_LT is not None else new_log_prob_LT.new_zeros(())
    if entropy_coef:
        loss = loss - entropy_coef * entropy_sum / n
    with torch.no_grad():
        sums = torch.stack([surrogate.double().sum(), entropy_sum.double(),
                            ((ratio - 1).abs() > clip_eps).double().sum(), ((ratio - 1) - log_ratio).double().sum()])
        stats = {"clip_frac": (sums[2] / n).item(), "approx_kl": (sums[3] / n).item(),
                 "entropy": (sums[1] / n).item(), "sums": sums}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# rollout and update


@dataclass
class Rollout:
    inputs_BS: torch.Tensor
    targets_BS: torch.Tensor
    action_LT: torch.Tensor
    old_log_prob_LT: torch.Tensor
    k_LT: torch.Tensor  # true experts used (the action's k: the router never drops)
    reward_T: torch.Tensor
    loglik_T: torch.Tensor


@torch.no_grad()
def rollout(model: MoETransformer, inputs_BS: torch.Tensor, targets_BS: torch.Tensor, penalty: float,
            mode: str = "sample", forced_action_LT: Optional[torch.Tensor] = None,
            uniform_LT: Optional[torch.Tensor] = None) -> Rollout:
    """One forward with the allocators in ``mode`` (sample: a ~ pi, by inverse CDF from ``uniform_LT`` when given,
    else from the global RNG; greedy: argmax; forced: ``forced_action_LT``); actions, their log-probs and the
    per-token rewards."""
    with routing_mode(adak_routers(model), mode, forced_action_LT, uniform_LT):
        logits, plans = model(inputs_BS, return_plans=True)
    action_LT = torch.stack([p.action_T for p in plans])
    k_LT = torch.stack([p.true_mask_TK.sum(dim=-1) for p in plans])
    reward_T, loglik_T = token_rewards(logits, targets_BS, k_LT, penalty)
    return Rollout(inputs_BS, targets_BS, action_LT, torch.stack([p.log_prob_T for p in plans]), k_LT, reward_T,
                   loglik_T)


def forced_log_probs(model: MoETransformer, inputs_BS: torch.Tensor, action_LT: torch.Tensor,
                     forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_new(a | x)_LT, entropy_LT) with every layer forced to the stored actions; differentiable in W_p.
    ``forward``: the engine's module call the backward goes through (default: the model itself)."""
    with routing_mode(adak_routers(model), "forced", action_LT):
        _, plans = (model if forward is None else forward)(inputs_BS, return_plans=True)
    return torch.stack([p.log_prob_T for p in plans]), torch.stack([p.entropy_T for p in plans])


def as_engine(opt, model: nn.Module, params: Sequence[nn.Parameter], ctx: Optional[ParallelContext]):
    """``opt`` when it is an engine (train/engine.py), else a TorchEngine over the torch optimizer ``opt`` whose
    clipping covers ``params`` (the trainer's: the global norm over all ranks; torch's own in one process)."""
    if hasattr(opt, "clip_and_step"):
        return opt
    return TorchEngine(model, opt, ParallelContext() if ctx is None else ctx, params=list(params))


def _update(engine, loss: torch.Tensor, grad_clip: float, what: str) -> float:
    """One allocator update: backward, clipping (train.grad_clip; 0 = none, the norm is still measured), step.
    A non-finite loss or gradient norm fails the run before the optimizer step (the allocators would become NaN and
    be saved as final/model.pt): TrainingError naming the step, which the command line prints in one line (exit 1).
    The loss is the global one (every rank's part summed), so every rank takes the same decision."""
    total = float(all_reduce_sum(loss.detach().reshape(1).float(), engine.ctx)) if getattr(
        engine, "ctx", None) is not None and engine.ctx.distributed else float(loss.detach())
    if not math.isfinite(total):
        raise TrainingError(f"Ada-K diverged at {what}: non-finite allocator loss {total}; nothing was saved from "
                            "it; lower adak.lr or set train.grad_clip, and check the base model (train.init_from)")
    engine.zero_grad()
    engine.backward(loss)
    norm, stepped = engine.clip_and_step(grad_clip)
    if not stepped or not math.isfinite(float(norm)):
        raise TrainingError(f"Ada-K diverged at {what}: non-finite allocator gradient norm {float(norm)}; nothing "
                            "was saved from it; lower adak.lr or set train.grad_clip")
    return float(norm)


def _rows(B: int, S: int, seqs: torch.Tensor) -> torch.Tensor:
    """Token indices (into T = B*S) of the sequences ``seqs``."""
    return (seqs[:, None] * S + torch.arange(S, device=seqs.device)[None, :]).reshape(-1)


def ppo_step(model: MoETransformer, opt: torch.optim.Optimizer, params: Sequence[nn.Parameter],
             inputs_BS: torch.Tensor, targets_BS: torch.Tensor, a: AdaKConfig, baseline: RewardBaseline,
             grad_clip: float, generator: torch.Generator, ctx: Optional[ParallelContext] = None,
             step: int = 0) -> dict:
    """Rollout (in chunks), advantages over the whole batch, ppo_epochs x ppo_minibatches updates (module docstring).

    ``inputs_BS`` is this rank's share of the global batch: the ctx.dp_rank-th contiguous B of dp_size * B
    sequences (moe_train/data/packing.py). ``generator`` must be in the same state on every rank: the sampling
    uniforms and the minibatch permutations are drawn from it for the GLOBAL batch (each step consumes the same
    amount on every rank and at every world size), and each rank takes its own part (module docstring)."""
    B, S = inputs_BS.shape
    distributed = ctx is not None and ctx.distributed
    dp_size, dp_rank = (ctx.dp_size, ctx.dp_rank) if distributed else (1, 0)
    B_global, first = dp_size * B, dp_rank * B  # this rank holds global sequences [first, first + B)
    L = len(adak_routers(model))
    device = inputs_BS.device
    uniform_LT = torch.rand(L, B_global * S, generator=generator)[:, first * S:(first + B) * S].to(device)
    # Rollouts in chunks of at most the global minibatch size (ceil(B_global / ppo_minibatches) sequences): that
    # bounds activation memory as in one process, without grad the chunking does not change the result, and with
    # equal shares every rank runs the same number of forwards (the all-to-all needs every rank in each).
    chunks = torch.arange(B, device=device).split(-(-B_global // a.ppo_minibatches))
    outs = [rollout(model, inputs_BS[c], targets_BS[c], a.penalty, uniform_LT=uniform_LT[:, _rows(B, S, c)])
            for c in chunks]
    action_LT = torch.cat([o.action_LT for o in outs], dim=1)
    old_LT = torch.cat([o.old_log_prob_LT for o in outs], dim=1)
    k_LT = torch.cat([o.k_LT for o in outs], dim=1)
    reward_T = torch.cat([o.reward_T for o in outs])
    loglik_T = torch.cat([o.loglik_T for o in outs])
    greedy_T = None
    if baseline.kind == "greedy":
        greedy_T = torch.cat([rollout(model, inputs_BS[c], targets_BS[c], a.penalty, mode="greedy").reward_T
                              for c in chunks])
    b = baseline(reward_T, greedy_T, ctx)
    adv_T = compute_advantages(reward_T, b, a.normalize_advantages, ctx=ctx)
    # FSDP2 averages the allocator gradients over all ranks (the root unit reduces over the world mesh, divide
    # factor world_size: parallel/parallelize.py); scaling each rank's loss by it makes the reduced gradient the
    # gradient of the global minibatch loss.
    grad_scale = ctx.world_size if distributed else 1
    sums_M4, counts_M = [], []  # per minibatch: this rank's statistic sums, the global action count
    grad_norm = None
    engine = as_engine(opt, model, params, ctx)  # a torch optimizer or the run's engine (DeepSpeed)
    for _ in range(a.ppo_epochs):
        perm_global = torch.randperm(B_global, generator=generator)
        for mb_global in perm_global.chunk(a.ppo_minibatches):
            # the minibatch is a set of GLOBAL sequences (the same partition at every world size); the loss is the
            # mean over all its (layer, token) actions: each rank's sum divided by the global count
            count = L * mb_global.numel() * S
            seqs = (mb_global[(mb_global >= first) & (mb_global < first + B)] - first).to(device)
            idx = _rows(B, S, seqs)  # empty when this rank holds none of the minibatch
            # An empty share still runs the [0, S] forward and the backward: the forward's all-to-all and the
            # backward's FSDP reduce-scatter are collectives every rank must join; its loss is an empty sum, 0.
            new_LT, ent_LT = forced_log_probs(model, inputs_BS[seqs], action_LT[:, idx], engine.forward)
            loss, st = ppo_objective(new_LT, old_LT[:, idx], adv_T[idx], a.clip_eps, ent_LT, a.entropy_coef,
                                     num_actions=count)
            grad_norm = _update(engine, loss * grad_scale, grad_clip, f"ppo step {step}" if step else "ppo")
            sums_M4.append(st["sums"])
            counts_M.append(count)
    rollout_stats = Rollout(inputs_BS, targets_BS, action_LT, old_LT, k_LT, reward_T, loglik_T)
    return _ppo_record(model, rollout_stats, b, sums_M4, counts_M, grad_norm, a, ctx)


def _ppo_record(model: MoETransformer, ro: Rollout, b, sums_M4: list[torch.Tensor], counts_M: list[int],
                grad_norm: Optional[float], a: AdaKConfig, ctx: Optional[ParallelContext]) -> dict:
    """The step's metrics: global statistics per minibatch (one all-reduce for the step), then their mean over the
    minibatches; the rollout's figures as global-batch means."""
    S = ro.inputs_BS.shape[1]
    reward_T, loglik_T, k_LT = ro.reward_T, ro.loglik_T, ro.k_LT
    sums_M4 = torch.stack(sums_M4)
    if ctx is not None and ctx.distributed:
        sums_M4 = all_reduce_sum(sums_M4, ctx)
    mean_M4 = sums_M4.cpu() / torch.tensor(counts_M, dtype=torch.float64)[:, None]
    surrogate_M, entropy_M = mean_M4[:, 0], mean_M4[:, 1]
    record = {"policy_loss": (-surrogate_M - a.entropy_coef * entropy_M).mean().item(),
              "clip_frac": mean_M4[:, 2].mean().item(), "approx_kl": mean_M4[:, 3].mean().item(),
              "entropy": entropy_M.mean().item()}
    per_layer = [global_mean(k_T.float(), ctx).item() for k_T in k_LT]
    record.update({
        "reward": global_mean(reward_T, ctx).item(),
        "loglik": global_mean(loglik_T, ctx).item(),
        "mean_k": sum(per_layer) / len(per_layer),
        "mean_k_per_layer": per_layer,
        "flops_vs_topk": flops_vs_topk(model.config, per_layer, S),
        "expert_flops_vs_topk": sum(per_layer) / len(per_layer) / model.config.moe.resolved_baseline_top_k,
        "advantage_std": global_mean((reward_T - b - global_mean(reward_T - b, ctx)) ** 2, ctx).sqrt().item(),
        "grad_norm": grad_norm,
    })
    return record


# ----------------------------------------------------------------------------------------------------------
# the run


class AdaKTrainer(Trainer):
    """Ada-K on the shared Trainer: the model is the frozen base with its allocators, and ``fit`` runs the two
    stages, each with its own AdamW over the allocators (the paper lists them separately): the warm start, then PPO
    over the same data from its start. Setup, metrics, logging, clipping and the final save are the Trainer's.

    Checkpoints (docs/adak.md): every train.checkpoint_every steps of either stage, at a stop signal and at the end,
    the engine's atomic checkpoint folder (io/dcp_checkpoint.py, train/deepspeed_engine.py) with trainable_only:
    the allocators and the stage's optimizer state, not the frozen base (train.init_from rebuilds it). Folder
    step_<n> numbers the steps of both stages in run order (n = warm-start step, or warm_start_steps + PPO step);
    trainer.pt holds the stage and its step, the data position, the PPO generator and baseline state, the
    validation reports so far and the config fingerprint. A resume (train.resume_from, or out_dir's latest with
    train.resume) checks the config against it (ADAK_MAY_CHANGE) and continues inside the stage it stopped in."""

    tensorboard = False  # metrics.jsonl only (its records mix stages and nested validation reports)

    def check_batch_layout(self, cfg: Config) -> None:
        pass  # no gradient accumulation: every step takes the rank's whole share (the data split checks that)

    def load_model(self, cfg: Config) -> MoETransformer:
        return load_adak_model(cfg, self.ctx)

    def prepare_model(self, model: MoETransformer, built: bool = False) -> torch.nn.Module:
        if not built:  # handed over whole
            model = model.to(self.ctx.device)
            freeze_base(model)
        # the engine's parallelism (Engine.prepare_model): expert shards + all-to-all dispatch, the allocators'
        # gradients averaged over all ranks (FSDP2, or DeepSpeed); the allocator decides k before dispatch, so each
        # token sends only its k rows. The base does not train: no bf16 mixed precision (adak.dtype is its dtype)
        model = self.engine_type.prepare_model(model, self.ctx, built=built)
        self.params = [r.allocator.weight for r in adak_routers(model)]  # what the stages' optimizers train
        return model

    resume_point: Optional[dict] = None  # the checkpoint a resumed run continues from: path, stage, step (setup)

    def remove_crash_leftovers(self) -> None:
        """The Trainer's, and a previous Ada-K run's outputs in out_dir (only our own file names): a run that stops
        early (a signal, a failure) must not leave the old final/model.pt and validation.json beside this run's
        config.yaml, where they would read as this run's results. A run resumed in its PPO stage keeps
        warm_start/model.pt: its own warm start wrote it (the resumed run does not repeat that stage)."""
        super().remove_crash_leftovers()
        stale = [self.out_dir / "final" / "model.pt", self.out_dir / "validation.json"]
        if self.resume_point is None or self.resume_point["stage"] != "ppo":
            stale.append(self.out_dir / "warm_start" / "model.pt")
        stale = [p for p in stale if p.is_file()]
        for p in stale:
            p.unlink()
        if stale:
            logger.info("removed the previous run's outputs: " + ", ".join(str(p) for p in stale))

    def setup_optimizer(self) -> int:
        """Each stage makes its own optimizer (stage_engine); here only the checkpoint to resume from is found and
        checked (the Trainer's rule: train.resume_from, else out_dir's latest with train.resume) before any work.
        Returns the steps of both stages already taken (the checkpoint's folder number)."""
        self.engine = self.opt = None
        self.last_saved: Optional[int] = None  # the run step of the last checkpoint this run wrote
        t = self.cfg.train
        path = Path(t.resume_from) if t.resume_from else (latest_checkpoint(self.out_dir) if t.resume else None)
        if path is None:
            return 0
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
        check_resume(path, self.cfg, self.ctx, ADAK_MAY_CHANGE)  # the config's math against the checkpoint's
        verify_checkpoint(path)  # complete and intact before trainer.pt is read (the engine verifies it again)
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if "adak" not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} was not written by an Ada-K run (moe-train adak): resume "
                                  "it with `moe-train train`, or start this run in another train.out_dir (or with "
                                  "train.resume=false)")
        self.resume_point = {"path": path, "stage": state["adak"]["stage"], "step": state["adak"]["step"]}
        return state["step"]

    def kept_metrics(self):
        """A resumed run keeps the metrics records up to its checkpoint's stage and step (both stages count from 1);
        a fresh run starts the file empty (None with start step 0)."""
        if self.resume_point is None:
            return None
        until = (STAGES.index(self.resume_point["stage"]), self.resume_point["step"])
        return lambda r: r.get("stage") in STAGES and (STAGES.index(r["stage"]), r.get("step", 0)) <= until

    def run_line(self) -> str:
        t, a = self.cfg.train, self.cfg.adak
        r = self.resume_point
        resumed = f", resuming after {r['stage']} step {r['step']}" if r is not None else ""
        return (f"run: Ada-K, {a.warm_start_steps} warm-start + {a.ppo_steps} PPO steps of {t.batch_size} sequences "
                f"x {t.seq_len} tokens, log every {t.log_every}{resumed} -> {self.out_dir}")

    def precision_label(self) -> str:
        return f"frozen base {str(adak_base_dtype(self.cfg)).replace('torch.', '')}, allocators fp32"

    def stage_engine(self):
        """A fresh AdamW over the allocators for a stage, in the run's engine (train/engine.py): made at the first
        stage, restarted with the new AdamW at the second (Engine.restart_optimizer; DeepSpeed keeps its one
        deepspeed.initialize and resets the optimizer state, the same as a new AdamW)."""
        opt = build_allocator_optimizer(self.params, self.cfg.adak, self.cfg.train)
        if self.engine is None:
            self.engine = self.make_engine(opt, params=self.params, accum=1)  # Ada-K steps once per backward
        else:
            self.engine.restart_optimizer(opt)
        self.opt = self.engine.opt  # the stage's optimizer: the Trainer's ensure_finite checks its state
        return self.engine  # also the Trainer's: save_model_file gathers the model through it

    def validate(self) -> dict:
        """The validation report (moe_train/eval/report.py) with the greedy allocator, and the loss increase over
        the same model run at its base top-k."""
        if self.data.val_tokens is None:
            return {}
        B, device = self.cfg.train.batch_size, self.ctx.device
        corpus = get_corpus(self.cfg.data.corpus)  # names and groups of the validation labels
        names = {"label_names": corpus.labels, "label_groups": corpus.groups}
        rep = corpus_report(self.model, self.data.val_batches(B), device, **names)
        base = corpus_report(self.model, self.data.val_batches(B), device, force_k=self.cfg.model.moe.top_k, **names)
        rep["base_val_loss"] = base["val_loss"]
        rep["val_loss_increase"] = rep["val_loss"] / base["val_loss"] - 1
        return rep

    @handles_stop_signals
    def fit(self) -> dict:
        a = self.cfg.adak
        self.model.eval()  # no dropout anywhere; mode flags only
        resume = self.resume_point
        # the reports so far: restored on resume (the allocators they describe are gone), saved in each checkpoint
        self.validation = {"before": self.validate()} if resume is None else None
        if resume is None or resume["stage"] == "warm_start":
            self.warm_start()
            if a.warm_start_steps:
                self.validation["warm_start"] = self.validate()
                self.save_model_file("warm_start", a.warm_start_steps)
        record = self.ppo()
        self.validation["final"] = self.validate()
        path = self.save_model_file("final", a.ppo_steps)
        if self.ctx.is_main:
            (self.out_dir / "validation.json").write_text(json.dumps(self.validation, indent=1))
        self.log_validation(self.validation["final"])
        logger.info(f"saved {path}")
        return {"last_step": record, "validation": self.validation}

    def resume_stage(self, engine, stage: str) -> Optional[dict]:
        """When the run resumes inside ``stage``: the checkpoint loaded into ``engine`` (the allocators and the
        stage's optimizer state) and the data position restored; the Ada-K state of trainer.pt, else None."""
        r = self.resume_point
        if r is None or r["stage"] != stage:
            return None
        state = engine.load_checkpoint(r["path"], trainable_only=True)
        self.data.train.load_state_dict(state["data"])
        self.validation = state["adak"]["validation"]
        logger.info(f"resumed from {r['path']} after {stage} step {r['step']}")
        return state["adak"]

    def run_step(self, stage: str, step: int) -> int:
        """The folder number of a stage's step: the steps of both stages counted in run order."""
        return step if stage == "warm_start" else self.cfg.adak.warm_start_steps + step

    def checkpoint_stage(self, stage: str, step: int) -> None:
        """The resumable state after ``stage`` step ``step`` (class docstring); never from a non-finite state."""
        n = self.run_step(stage, step)
        self.ensure_finite(n, f"checkpoint step_{n:08d}")
        adak = {"stage": stage, "step": step, "validation": self.validation}
        if stage == "ppo":  # what the remaining PPO steps draw from and compare against
            adak.update(generator=self.generator.get_state(), baseline=self.baseline.value)
        self.engine.save_checkpoint(self.out_dir, n, {"data": self.data.train.state_dict(), "adak": adak,
                                                      "config": config_record(self.cfg, self.ctx)},
                                    self.cfg.train.keep_last, trainable_only=True)
        self.last_saved = n

    def warm_start(self) -> None:
        """Stage 1: the allocators learn the pseudo labels of the frozen router (module docstring)."""
        t, a, ctx = self.cfg.train, self.cfg.adak, self.ctx
        engine = self.stage_engine()
        resumed = self.resume_stage(engine, "warm_start")
        first = 1 if resumed is None else resumed["step"] + 1
        if first <= a.warm_start_steps:
            logger.info(WARM_START_LEGEND)
        for step in range(first, a.warm_start_steps + 1):
            start = time.perf_counter()
            inputs, _ = self.data.train.next_batch()
            loss, st = warm_start_loss(self.model, inputs.to(ctx.device), a.warm_start_threshold, engine.forward)
            _update(engine, loss, t.grad_clip, f"warm start step {step}")
            st = mean_stats_over_ranks(st, ctx)
            record = {"stage": "warm_start", "step": step, "ce_loss": global_mean(loss.detach(), ctx).item(), **st,
                      "seconds": time.perf_counter() - start}
            self.metrics.write(record)
            # periodic; and the last step when no PPO follows (the run's final checkpoint, as the Trainer's)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or (step == a.warm_start_steps
                                                                         and not a.ppo_steps):
                self.checkpoint_stage("warm_start", step)
            if step % t.log_every == 0 or step == a.warm_start_steps:
                logger.info(f"warm start {step}/{a.warm_start_steps} ce {record['ce_loss']:.4f} label k "
                            f"{st['label_k']:.2f} acc {st['label_acc']:.3f}")
            self.stop_if_preempted_adak("warm_start", step)
        engine.zero_grad()  # nothing of this stage reaches the PPO optimizer

    def ppo(self) -> dict:
        """Stage 2: PPO over the same data from its start (each stage is one pass in the paper); the last record."""
        t, a, ctx = self.cfg.train, self.cfg.adak, self.ctx
        self.data.train.load_state_dict({"consumed": 0})
        engine = self.stage_engine()
        self.baseline = RewardBaseline(a.baseline, a.running_mean_decay)
        self.generator = torch.Generator().manual_seed(t.seed)  # the same stream on every rank: uniforms, minibatches
        resumed = self.resume_stage(engine, "ppo")
        first = 1
        if resumed is not None:
            self.generator.set_state(resumed["generator"])
            self.baseline.value = resumed["baseline"]
            first = resumed["step"] + 1
        record: dict = {}
        if first <= a.ppo_steps:
            logger.info(PPO_LEGEND)
        for step in range(first, a.ppo_steps + 1):
            start = time.perf_counter()
            inputs, targets = self.data.train.next_batch()
            record = ppo_step(self.model, engine, self.params, inputs.to(ctx.device), targets.to(ctx.device), a,
                              self.baseline, t.grad_clip, self.generator, ctx, step)
            record = {"stage": "ppo", "step": step, **record, "seconds": time.perf_counter() - start}
            if a.val_every and step % a.val_every == 0 and step < a.ppo_steps:
                record["validation"] = self.validate()
                self.log_validation(record["validation"], f"ppo step {step}")  # printed, not only in metrics.jsonl
            self.metrics.write(record)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == a.ppo_steps:  # periodic; final
                self.checkpoint_stage("ppo", step)
            if step % t.log_every == 0 or step == a.ppo_steps:
                logger.info(f"ppo {step}/{a.ppo_steps} reward {record['reward']:.4f} loglik {record['loglik']:.4f} "
                            f"k {record['mean_k']:.3f} flops/topk {record['flops_vs_topk']:.3f} "
                            f"kl {record['approx_kl']:.4f} clip {record['clip_frac']:.3f} H {record['entropy']:.3f}")
            self.stop_if_preempted_adak("ppo", step)
        return record

    def stop_if_preempted_adak(self, stage: str, step: int) -> None:
        """After a warm-start or PPO step: when a stop signal reached any rank (one small all-reduce per step; an
        Ada-K step has no scalar all-reduce to share), every rank writes the checkpoint of this step unless the
        periodic one just did, and the run ends with Preempted (exit code 0); the same command resumes from it."""
        if not self.preemption.agree_now(self.ctx):
            return
        rank_log.info(f"rank {self.ctx.rank}: {self.preemption.reason()}: stopping after {stage} step {step}")
        if self.last_saved != self.run_step(stage, step):
            self.checkpoint_stage(stage, step)
        latest = latest_checkpoint(self.out_dir)
        logger.warning(f"stopped by {self.preemption.reason()} after {stage} step {step}: checkpoint {latest}; the "
                       "same command resumes from it (train.resume)")
        raise Preempted(step, self.preemption.reason(), latest)

    def log_validation(self, fin: dict, when: str = "final") -> None:
        if fin:
            logger.info(f"validation ({when}): loss {fin['val_loss']:.4f} (top-{self.cfg.model.moe.top_k} base "
                        f"{fin['base_val_loss']:.4f}, {100 * fin['val_loss_increase']:+.2f}%) mean k "
                        f"{fin['mean_k']:.3f} expert FLOPs vs top-k {fin['expert_flops_vs_topk']:.3f} whole-model "
                        f"FLOPs vs top-k {fin['flops_vs_topk']:.3f}")


def mean_stats_over_ranks(stats: dict, ctx: Optional[ParallelContext]) -> dict:
    """Each float (or list of floats) of ``stats`` averaged over the ranks, in ONE all-reduce. The values are packed
    on ctx.device: NCCL takes CUDA tensors only (a CPU tensor passes on gloo, so only a GPU run would see it)."""
    if ctx is None or not ctx.distributed:
        return stats
    flat = [x for v in stats.values() for x in (v if isinstance(v, list) else [v])]
    mean = all_reduce_mean(torch.tensor(flat, dtype=torch.float64, device=ctx.device), ctx).tolist()
    out, i = {}, 0
    for k, v in stats.items():
        n = len(v) if isinstance(v, list) else 1
        out[k] = mean[i:i + n] if isinstance(v, list) else mean[i]
        i += n
    return out


def train_adak(cfg: Config, model: Optional[MoETransformer] = None, ctx: Optional[ParallelContext] = None) -> dict:
    """Warm start then PPO as configured; writes metrics.jsonl, validation.json and final/model.pt to train.out_dir.

    ``model``: an Ada-K model to train in place (default: loaded from train.init_from and converted). Without a
    ``ctx`` the process groups come from the launch environment (torchrun, launch/) and are torn down at the end."""
    with distributed(cfg.parallel, cfg.model.moe.num_experts, ctx, exclusive=OutDirLock(cfg.train.out_dir)) as ctx:
        trainer = AdaKTrainer(cfg, ctx, model)
        try:
            return trainer.fit()
        finally:
            if trainer.engine is not None:
                trainer.engine.close()
