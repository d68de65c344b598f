"""Per-rank peak memory of one training step: what persists, what one micro-batch adds, at which moment it peaks.

  persistent   parameter shards (storage dtype) + buffers + AdamW moments (2 x the trainable shards) + the
               sharded gradients (from the first micro-batch's backward to the next step's zero_grad: present
               during micro-batches 2.. of an accumulated step and in the optimizer step)
  gathered     FSDP2 (world > 1), units per decoder block (parallel/parallelize.py): at the start of the backward
               the units kept gathered since their forward (the root, the last block, norm + head); in a layer's
               backward the root plus two blocks' non-expert parameters and two experts units (current +
               prefetched next), all in the compute dtype; at the end of the backward the root and the embedding
  activations  moe_train/planner/activations.py, all layers (or, with activation checkpointing, every layer's input
               and routing plan plus one recomputed layer)
  backward     the fp32 gradients of the log-probabilities and the logits (8V per token) at the loss, and per
               layer the gradients of its widest tensors (three R x F, or T x Fd of a dense MLP, in c; two T x D
               in r); a unit's unsharded gradients (compute dtype) and their reduce-scatter input (fp32) when its
               backward ends (the largest block / experts unit in a layer's backward, the embedding at the end; the
               root's wait for the end of the backward). The gradients of the units already done are fp32 shards.
The peak is the largest of: the start of the backward (all activations + logits gradient), a layer's backward
(each layer's: checkpointing's recomputed layer, its widest gradients, the gradients of the layers after it), the end
of the backward (gradients + reduce buffers), the optimizer step. Weights that do not train are stored in the compute
dtype (train/build.py: bf16 under bf16 precision) and have no gradient and no optimizer state; what the plan counts
is read off the parameters themselves (planner/shard.py).
Ada-K (moe_train/train/adak.py): forward-only rollouts of ceil(global batch / ppo_minibatches) sequences (the
residual stream plus the widest op group: attention block, expert rows, or logits with their fp32 log-softmax) and
PPO forwards that save only the allocators' inputs; the frozen base has no gradients and no optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moe_train.planner.activations import Regime, head_activations, head_casts, layer_activations
from moe_train.planner.shard import PlanError, ShardReport


@dataclass
class Workload:
    """Tokens and expert rows of one micro-batch on one rank (rows per MoE layer)."""

    tokens: int  # T
    rows_sent: float  # N: this rank's true assignments per layer
    rows_recv: float  # R: rows its experts compute per layer
    accumulating: bool  # grad_accum_steps > 1: sharded gradients live during later micro-batches
    grad_tokens: int = 0  # Ada-K: tokens of a PPO update forward (saved allocator inputs); train: = tokens


@dataclass
class MemoryBreakdown:
    params: int = 0
    buffers: int = 0
    optimizer: int = 0
    gradients: int = 0
    gathered_params: int = 0
    activations: int = 0
    backward_transient: int = 0
    reduce_buffers: int = 0
    peak: int = 0
    peak_at: str = ""
    candidates: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


def train_memory(model: nn.Module, rep: ShardReport, reg: Regime, w: Workload, ac: bool,
                 gpu_fused_adam: bool = True) -> MemoryBreakdown:
    m = MemoryBreakdown()
    m.params, m.buffers = rep.total("sharded"), rep.buffers
    trainable = rep.total("sharded_trainable")
    m.optimizer = 2 * trainable
    m.gradients = trainable
    g = gathered_moments(rep)
    m.gathered_params = max(g.values())
    T, R, N = w.tokens, w.rows_recv, w.rows_sent
    layers = [layer_activations(layer, reg) for layer in _decoder_layers(model)]
    head = head_activations(model, reg) * T + head_casts(model, reg)
    full = [la.bytes(T, R, N) for la in layers]
    layer_bwd = max(la.backward_widest(T, R) for la in layers) + 2 * reg.r * _hidden(model) * T
    # the cross-entropy backward holds the fp32 gradient of the log-probabilities and of the logits at once
    logits_grad = 8 * _vocab(model) * T
    if ac:
        kept = sum(la.ckpt_per_token * T for la in layers) + head
        m.activations = kept + max(full)
    else:
        kept = sum(full) + head
        m.activations = kept
    static = m.params + m.buffers + m.optimizer + (m.gradients if w.accumulating else 0)
    # at the start of the backward no experts unit and no block but the last is gathered (they reshard after forward)
    cands = {"backward start": static + g["backward start"] + kept + logits_grad}
    # the first layer's backward comes last: every later layer's and the head's gradients already exist (under
    # FSDP2 already reduce-scattered to fp32 shards, unit by unit; only the root unit's, unsharded in the compute
    # dtype, wait for the end) (while accumulating, the sharded or one-process gradients are already counted in
    # static; the root unit's unsharded compute-dtype gradients are new in every micro-batch)
    # ... and so on for every layer i: its recomputed activations and widest gradients, the later ones' gradients
    # (the largest layer need not be the first: DeepSeek's dense first layers)
    two_td = 2 * reg.r * _hidden(model) * T
    per_layer = []
    for i, la in enumerate(layers):
        later_unsharded, later_other = _later_grad_bytes(model, rep, reg, i)
        per_layer.append((full[i] if ac else 0) + la.backward_widest(T, R) + two_td + later_unsharded
                         + (0 if w.accumulating else later_other))
    unit_reduce = _reduce_over_gathered(rep)  # the unit whose backward just ended
    cands["layer backward"] = static + g["layer backward"] + kept - head + max(per_layer) + unit_reduce
    m.reduce_buffers = _reduce_bytes(rep, ("root",), every=True) + _reduce_bytes(rep, ("other",))
    cands["backward end"] = m.params + m.buffers + m.optimizer + m.gradients + g["backward end"] + m.reduce_buffers
    biggest = max((p.numel() * 4 for p in model.parameters() if p.requires_grad), default=0)
    cands["optimizer step"] = m.params + m.buffers + m.optimizer + m.gradients + (0 if gpu_fused_adam else 2 * biggest)
    m.backward_transient = int(max(logits_grad, layer_bwd))
    m.candidates = {k: int(v) for k, v in cands.items()}
    m.peak_at, m.peak = max(m.candidates.items(), key=lambda kv: kv[1])
    return m


def gathered_moments(rep: ShardReport) -> dict[str, int]:
    """FSDP2 parameters gathered in the compute dtype at each moment of a step (0 everywhere in one process).
    FSDP2 prefetches the next unit's all-gather while the current one computes: two blocks (and two experts
    units) at a time in the backward; units kept after forward (the root, the last block, norm + head) stay
    gathered from their forward to their own backward."""
    if rep.world_size == 1:
        return {"backward start": 0, "layer backward": 0, "backward end": 0}
    root = _unsharded(rep, "root", every=True)
    kept = sum(u.unsharded for u in rep.units if u.kept_after_forward and u.kind != "experts")
    return {"backward start": kept,
            "layer backward": root + 2 * _unsharded(rep, "block") + 2 * _unsharded(rep, "experts"),
            "backward end": root + _unsharded(rep, "other")}  # the embedding's backward comes last


def _unsharded(rep: ShardReport, kind: str, every: bool = False) -> int:
    """The gathered bytes of the largest unit of ``kind`` (``every``: of all of them)."""
    sizes = [u.unsharded for u in rep.units if u.kind == kind]
    return sum(sizes) if every else max(sizes, default=0)


def _reduce_bytes(rep: ShardReport, kinds: tuple[str, ...], every: bool = False) -> int:
    """A unit's unsharded gradients (compute dtype) + its fp32 reduce-scatter input, at the end of its backward:
    of the largest unit of ``kinds`` (``every``: all of them at once, the root's wait for the end). 0 in one
    process (no reduce-scatter)."""
    if rep.world_size == 1:
        return 0
    sizes = [u.unsharded_trainable + u.unsharded_trainable_reduce for u in rep.units if u.kind in kinds]
    return sum(sizes) if every else max(sizes, default=0)


def _reduce_over_gathered(rep: ShardReport) -> int:
    """What a block or experts unit adds at the end of its backward: FSDP2's post-backward frees the unit's gathered
    parameters before it reduce-scatters, so its unsharded gradients + the fp32 reduce-scatter input take the
    place of those parameters (the prefetched next unit stays gathered)."""
    if rep.world_size == 1:
        return 0
    return max((max(u.unsharded_trainable + u.unsharded_trainable_reduce - u.unsharded, 0)
                for u in rep.units if u.kind in ("block", "experts")), default=0)


def adak_memory(model: nn.Module, rep: ShardReport, reg: Regime, w: Workload) -> MemoryBreakdown:
    m = MemoryBreakdown()
    m.params, m.buffers = rep.total("sharded"), rep.buffers
    trainable = rep.total("sharded_trainable")
    m.optimizer, m.gradients = 2 * trainable, trainable
    # a forward only: the units kept after forward, the current and the prefetched block, one experts unit
    kept = sum(u.unsharded for u in rep.units if u.kept_after_forward and u.kind != "experts")
    m.gathered_params = kept + 2 * _unsharded(rep, "block") + _unsharded(rep, "experts") if rep.world_size > 1 \
        else 0
    D, V = _hidden(model), _vocab(model)
    A = max(layer.moe.router.k_max - layer.moe.router.k_min + 1 for layer in model.layers if layer.moe is not None)
    T, Tg = w.tokens, w.grad_tokens
    # a forward of the frozen base saves nothing but the allocators' fp32 inputs and log-probs; it holds the
    # residual stream and one op group's outputs at a time, then the logits with their fp32 copy and log-softmax
    head_fwd = T * V * (reg.c + (4 if reg.c != 4 else 0) + 4)
    rollout = 2 * reg.r * D * T + max(_forward_block(model, reg, T, w.rows_recv), head_fwd)
    # the allocator's fp32 input (a copy of a bf16 hidden state, or the fp32 norm output itself: kept alive either
    # way) and its log-probabilities, per MoE layer
    saved = sum(1 for layer in model.layers if layer.moe is not None) * Tg * (4 * D + 8 * A)
    ppo = saved + 2 * reg.r * D * Tg + _forward_block(model, reg, Tg, w.rows_recv * Tg / max(T, 1))
    m.activations = int(saved)
    static = m.params + m.buffers + m.optimizer + m.gradients
    m.candidates = {"rollout forward": int(static + m.gathered_params + rollout),
                    "PPO forward": int(static + m.gathered_params + ppo)}
    m.peak_at, m.peak = max(m.candidates.items(), key=lambda kv: kv[1])
    return m


def _forward_block(model: nn.Module, reg: Regime, T: float, R: float) -> float:
    """The widest op group of a no-grad forward, over the layers: the attention block (its input and the outputs of
    all its projections, whatever the attention kind: read off its Linear modules), the routed experts (rows, gate,
    up, product; router scores), a dense or shared SwiGLU (input, gate, up, product)."""
    widest = 0.0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, nn.Module):
            raise PlanError(f"no forward working-set formula for decoder layer {type(layer).__name__}: add it to "
                            "moe_train/planner/memory.py")
        D = _hidden(model)
        for one in (attn if isinstance(attn, nn.ModuleList) else [attn]):  # LongCat-Flash: two attention sublayers
            outs = sum(mod.out_features for mod in one.modules() if isinstance(mod, nn.Linear))
            widest = max(widest, T * reg.c * (D + outs))
        if layer.moe is not None:
            F = layer.moe.experts.w_gate.shape[-1]
            widest = max(widest, R * reg.c * (D + 3 * F) + T * 8 * layer.moe.router.num_experts)
        mlps = [getattr(layer, "mlp", None), *getattr(layer, "mlps", [])]
        if layer.moe is not None:
            mlps += [getattr(layer.moe, "shared_expert", None), getattr(layer.moe, "shared_experts", None)]
        for mlp in mlps:
            if mlp is not None:
                widest = max(widest, T * reg.c * (D + 3 * _out_features(mlp.gate_proj)))
    return widest


def _later_grad_bytes(model: nn.Module, rep: ShardReport, reg: Regime, layer: int = 0) -> tuple[float, float]:
    """Gradient bytes present while decoder layer ``layer`` runs its backward, of every trainable parameter outside
    layers 0..layer and the embedding: (the root unit's unsharded compute-dtype gradients, which wait for the end of
    the backward; the rest: every other FSDP2 unit reduce-scatters at the end of its own backward, so its gradients
    are fp32 shards by now, and full gradients in one process)."""
    from torch.distributed.tensor import DTensor

    first = {id(p) for block in list(model.layers)[:layer + 1] for p in block.parameters()}
    first |= {id(p) for p in model.embed_tokens.parameters()}
    root = set().union(*(u.param_ids for u in rep.units if u.kind == "root"))
    unsharded = other = 0.0
    for p in model.parameters():
        if not p.requires_grad or id(p) in first:
            continue
        if id(p) in root:
            unsharded += p.numel() * reg.c
        elif isinstance(p, DTensor):
            other += p.to_local().numel() * p.element_size()
        else:
            other += p.numel() * p.element_size()
    return unsharded, other


def _hidden(model: nn.Module) -> int:
    return model.norm.weight.shape[0]


def _vocab(model: nn.Module) -> int:
    return model.lm_head.weight.shape[0]


def _out_features(proj: nn.Module) -> int:
    """A Linear's or LoRALinear's output width."""
    return getattr(proj, "base", proj).out_features
