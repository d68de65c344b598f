"""Per-rank peak memory of one training step: what persists, what one micro-batch adds, at which moment it peaks.

  persistent   parameter shards (storage dtype) + buffers + AdamW moments (2 x the trainable shards) + the
               sharded gradients (from the first micro-batch's backward to the next step's zero_grad: present
               during micro-batches 2.. of an accumulated step and in the optimizer step)
  gathered     FSDP2 (world > 1): the root unit's parameters in the compute dtype for the whole forward+backward
               (the root is not resharded after forward); per experts unit, its own gathered weights while it runs,
               two units at a time in the backward (current + prefetched next)
  activations  moe_train/planner/activations.py, all layers (or, with activation checkpointing, every layer's input
               and routing plan plus one recomputed layer)
  backward     the fp32 gradients of the log-probabilities and the logits (8V per token) at the loss, and per
               layer the gradients of its widest tensors (three R x F, or T x Fd of a dense MLP, in c; two T x D
               in r); at the end of the backward the root unit's unsharded gradients (compute dtype) and their
               reduce-scatter input (fp32)
The peak is the largest of: the start of the backward (all activations + logits gradient), a layer's backward
(each layer's: checkpointing's recomputed layer, its widest gradients, the gradients of the layers after it), the end
of the backward (gradients + reduce buffers), the optimizer step.
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
    distributed = rep.world_size > 1
    root = [u for u in rep.units if u.kind in ("root", "model")]
    experts = [u for u in rep.units if u.kind == "experts"]
    root_gathered = sum(u.unsharded for u in root) if distributed else 0
    expert_gathered = 2 * max((u.unsharded for u in experts), default=0) if distributed else 0
    m.gathered_params = root_gathered + expert_gathered
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
    # at the start of the backward no experts unit is gathered yet (each reshards after its forward)
    cands = {"backward start": static + root_gathered + kept + logits_grad}
    # the first layer's backward comes last: every later layer's and the head's gradients already exist (the
    # root unit's unsharded in the compute dtype under FSDP2, the experts' already reduce-scattered to shards)
    # (while accumulating, the sharded or one-process gradients are already counted in static; the root unit's
    # unsharded compute-dtype gradients are new in every micro-batch)
    # ... and so on for every layer i: its recomputed activations and widest gradients, the later ones' gradients
    # (the largest layer need not be the first: DeepSeek's dense first layers)
    two_td = 2 * reg.r * _hidden(model) * T
    per_layer = []
    for i, la in enumerate(layers):
        later_unsharded, later_other = _later_grad_bytes(model, rep, reg, i)
        per_layer.append((full[i] if ac else 0) + la.backward_widest(T, R) + two_td + later_unsharded
                         + (0 if w.accumulating else later_other))
    cands["layer backward"] = static + m.gathered_params + kept - head + max(per_layer)
    root_grads = sum(u.unsharded_trainable for u in root) if distributed else 0
    reduce = sum(u.unsharded_trainable_reduce for u in root) if distributed else 0
    m.reduce_buffers = root_grads + reduce
    cands["backward end"] = m.params + m.buffers + m.optimizer + m.gradients + m.gathered_params + m.reduce_buffers
    biggest = max((p.numel() * 4 for p in model.parameters() if p.requires_grad), default=0)
    cands["optimizer step"] = m.params + m.buffers + m.optimizer + m.gradients + (0 if gpu_fused_adam else 2 * biggest)
    m.backward_transient = int(max(logits_grad, layer_bwd))
    m.candidates = {k: int(v) for k, v in cands.items()}
    m.peak_at, m.peak = max(m.candidates.items(), key=lambda kv: kv[1])
    return m


def adak_memory(model: nn.Module, rep: ShardReport, reg: Regime, w: Workload) -> MemoryBreakdown:
    m = MemoryBreakdown()
    m.params, m.buffers = rep.total("sharded"), rep.buffers
    trainable = rep.total("sharded_trainable")
    m.optimizer, m.gradients = 2 * trainable, trainable
    distributed = rep.world_size > 1
    root = sum(u.unsharded for u in rep.units if u.kind in ("root", "model")) if distributed else 0
    expert = max((u.unsharded for u in rep.units if u.kind == "experts"), default=0) if distributed else 0
    m.gathered_params = root + expert
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
    layers 0..layer and the embedding: (the root unit's unsharded compute-dtype gradients under FSDP2, the rest: full
    gradients in one process, expert gradients as their reduce-scattered shards)."""
    from torch.distributed.tensor import DTensor

    first = {id(p) for block in list(model.layers)[:layer + 1] for p in block.parameters()}
    first |= {id(p) for p in model.embed_tokens.parameters()}
    experts = {id(p) for layer in model.layers if layer.moe is not None for p in layer.moe.experts.parameters()}
    unsharded = other = 0.0
    for p in model.parameters():
        if not p.requires_grad or id(p) in first:
            continue
        if isinstance(p, DTensor) and id(p) in experts:
            other += p.to_local().numel() * p.element_size()
        elif isinstance(p, DTensor):
            unsharded += p.numel() * reg.c
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
