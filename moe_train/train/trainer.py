"""The Trainer: from a validated Config to a trained model, metrics and checkpoints (pre-training, AdaMoE
fine-tuning, and, through its subclass in train/adak.py, Ada-K).

Model, parallelism and loop stay separate (torchtitan): the model is built plain (or loaded, and converted to
AdaMoE when the config asks for null experts on a top-k checkpoint), LoRA and freezing are applied, then the
engine (parallel.engine: train/engine.py, found in train/engine_registry.py) applies expert/data parallelism and runs
backward, step and checkpoints; the Trainer never asks which engine it is. The loop only sees a module that maps
input_ids to (logits, routing plans). ``train(cfg)`` is the entry point: ``Trainer(cfg, ctx).fit()``
inside the run's process groups.

Per optimizer step: grad_accum_steps micro-batches (loss / accum each), clipping over all ranks' shards, AdamW, LR
schedule, then the routing state updates that must be identical on every rank (aux-loss-free expert bias from
all-reduced counts; compute-budget bias from the all-reduced true experts per token of each layer).
Non-finite guard (every decision on all-reduced values: the same on every rank): a non-finite loss or global
gradient norm skips the step before AdamW and is counted (past train.max_bad_steps the run fails); after AdamW one
fused norm of the trainable parameters and moments rides on the routing counts' all-reduce, and a non-finite one
(confirmed element-wise) ends the run at once (TrainingError naming the last good checkpoint; the CLI exits 1). No checkpoint or final
model is ever written from a non-finite state (ensure_finite), so every checkpoint retention keeps is a good one.
Shape legend: B sequences per micro-batch, S sequence length, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from moe_train.config import Config, to_dict
from moe_train.data import Data, build_data, get_corpus
from moe_train.eval.report import corpus_report, validation_metrics
from moe_train.io.atomic import remove_leftovers
from moe_train.io.dcp_checkpoint import latest_checkpoint, remove_stale_temporaries
from moe_train.io.hf import to_hf_stream
from moe_train.io.lock import OutDirLock
from moe_train.io.model_file import ModelFileReader, save_model_stream
from moe_train.model import MoETransformer
from moe_train.model.flops import flops_vs_topk, forward_flops_per_token
from moe_train.model.lora import merge_lora_stream
from moe_train.model.loss import lm_loss, routing_losses
from moe_train.model.trainable import apply_trainable  # noqa: F401 (callers import it from here too)
from moe_train.parallel.collectives import all_reduce_mean, all_reduce_sum, local_tensor
from moe_train.parallel.compile import apply_compile
from moe_train.parallel.distributed import ParallelContext, distributed
from moe_train.routing.capacity import load_imbalance
from moe_train.routing.registry import router_class
from moe_train.train.build import build_job_model
from moe_train.train.engine_registry import build_engine, engine_class
from moe_train.train.fingerprint import check_resume, config_record, optimizer_hparams, reapply_hparams
from moe_train.train.metrics import MetricsWriter, TensorBoard, logger
from moe_train.train.preemption import Preempted, StopSignals, handles_stop_signals, rank_log


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
    """bf16 autocast only where the engine does not compute in bf16 itself (Engine.autocasts): a model FSDP2 wraps
    computes in bf16 through its MixedPrecisionPolicy (parallelize_model(param_dtype=bf16)), DeepSpeed's bf16 mode
    keeps the module's parameters in bf16 (fp32 masters in its optimizer); autocast is for the unsharded model."""
    return bf16_compute(cfg, device) and engine_class(cfg.parallel.engine).autocasts(model)


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
    """The model to train, whole, in one process: fresh, or loaded from train.init_from (converted to AdaMoE or to
    top-p routing if the config asks). The trainer itself builds rank by rank (train/build.py)."""
    return build_job_model(cfg)


def evaluate(model: torch.nn.Module, data: Data, cfg: Config, device: torch.device) -> dict:
    """Validation loss, true experts per token (overall, per layer, per difficulty label), FLOPs vs top-k, at the
    training precision, under the trainer's ``val_*`` names; {} without a held-out split (moe_train/eval/report.py)."""
    corpus = get_corpus(cfg.data.corpus)  # names and groups of the validation labels
    rep = corpus_report(model, data.val_batches(cfg.train.batch_size), device,
                        autocast=use_autocast(model, cfg, device), label_names=corpus.labels,
                        label_groups=corpus.groups)
    return validation_metrics(rep)


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

    def reduce(self, ctx: ParallelContext, state_norm: Optional[torch.Tensor] = None) -> dict:
        """``state_norm``: this rank's Trainer.state_norm, summed over ranks in the same collective (the result,
        "state_norm", is non-finite when some rank's is)."""
        L, E = self.counts_LE.shape
        check = self.tokens_L.new_zeros(1) if state_norm is None else state_norm.to(self.tokens_L).reshape(1)
        packed = all_reduce_sum(torch.cat([self.counts_LE.reshape(-1), self.selected_LE.reshape(-1), self.tokens_L,
                                           self.dropped_L, check]), ctx)  # one collective for all of it
        counts_LE, selected_LE = packed[:L * E].view(L, E), packed[L * E:2 * L * E].view(L, E)
        tokens, dropped = packed[2 * L * E:2 * L * E + L], packed[2 * L * E + L:-1]
        assigned = counts_LE.sum(1)
        imb = [load_imbalance(c, ctx.ep_size) for c in counts_LE]
        return {"counts_LE": counts_LE, "selected_counts_LE": selected_LE,
                "true_experts_per_layer": (assigned / tokens.clamp_min(1)).tolist(),
                "drop_rate": float(dropped.sum() / (assigned + dropped).sum().clamp_min(1)),
                "expert_imbalance": max(float(i["expert_max_over_mean"]) for i in imb),
                "rank_imbalance": max(float(i["rank_max_over_mean"]) for i in imb),
                "state_norm": float(packed[-1])}


def update_routing_state(routers, stats: dict, budget: bool) -> None:
    """After an optimizer step, from ``_RoutingAccumulator.reduce`` (all ranks' sums: the same state everywhere):
    the aux-loss-free expert bias from the PRE-drop selections (post-drop counts cap an overloaded expert at the
    capacity, which can equal the mean and hide the overload), the compute budget from the true experts per token
    that actually ran."""
    for router, selected_E, k_mean in zip(routers, stats["selected_counts_LE"], stats["true_experts_per_layer"]):
        router.update_bias(selected_E)  # a no-op for a router without a trained expert bias (routing/base.py)
        if budget:
            router.update_budget(k_mean)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters of the WHOLE model, from any rank: a DTensor (FSDP2) reports its global size,
    and an expert-parallel GroupedExperts holds only its block of experts, scaled back up to num_global (the counts
    are the same on every rank, so rank 0 can print them without a collective)."""
    total = trainable = 0
    for module in model.modules():
        shard = getattr(module, "ep_shard", None)
        for p in module.parameters(recurse=False):
            n = p.numel() * (shard.num_global // p.shape[0] if shard is not None else 1)
            total += n
            trainable += n if p.requires_grad else 0
    return total, trainable


def _count(n: float) -> str:
    """1234567 -> '1.23 M' (parameters and tokens read at a glance)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def router_line(cfg: Config) -> str:
    """The routing a run trains with, in the words of the config: experts, k, the FLOPs baseline, the budget."""
    e = cfg.model.moe
    experts = router_class(e.router).describe(e)
    line = f"router: {e.router}, {experts}; FLOPs baseline top-{e.resolved_baseline_top_k}"
    if e.target_true_experts is not None:
        line += (f"; compute budget: target {e.target_true_experts:g} true experts/token/layer "
                 f"(PI kp {e.budget_kp:g}, ki {e.budget_ki:g})")
    return line


def data_lines(cfg: Config, data: Data) -> list[str]:
    """What the run reads and what it validates on; a run without validation data says so before it starts (else
    the user learns it from a metrics.jsonl without val_loss after the run)."""
    d, t = cfg.data, cfg.train
    seen = t.steps * t.batch_size * t.seq_len
    if data.train.sequences is not None:
        n = data.train.sequences.shape[0]
        train = (f"{n} sequences x {t.seq_len} = {_count(n * t.seq_len)} tokens; the run reads {_count(seen)} "
                 f"({t.steps * t.batch_size / n:.2f} epochs)")
    else:
        train = f"streamed from {d.path} (size unknown until read); the run reads {_count(seen)} tokens"
    lines = [f"data: {d.kind}, train {train}"]
    if data.val_tokens is None:
        why = ("data.streaming without data.val_path" if d.streaming else
               "data.val_sequences: 0" if not d.val_sequences else "no held-out split")
        lines.append(f"validation: NONE ({why}): no val_loss, neither every train.eval_every steps nor at the end")
    else:
        every = f"every {t.eval_every} steps and " if t.eval_every else ""
        lines.append(f"validation: {data.val_tokens.shape[0]} sequences ({_count(data.val_tokens.numel())} tokens), "
                     f"{every}at the end")
    return lines


def step_line(record: dict, step: int, steps: int, eta: float, target: Optional[float]) -> str:
    """The progress line of a logged step: loss, routing (against the budget's target when there is one), speed,
    memory, lr, gradient norm, MFU (when train.peak_tflops is set)."""
    bar = "#" * int(20 * step / steps)
    experts = f"experts/token {record['true_experts_per_token']:.2f}"
    if target is not None:  # the controller's job at a glance: where it is against where it should be
        bias = record.get("null_bias_per_layer") or [0.0]
        experts += f" (target {target:.2f}, null bias {sum(bias) / len(bias):+.3f})"
    grad = "" if record.get("grad_norm") is None else f" gnorm {record['grad_norm']:.3f}"
    mfu = f" mfu {100 * record['mfu']:.2f}%" if "mfu" in record else ""
    return (f"[{bar:<20}] step {step}/{steps} loss {record['loss']:.4f} lm {record['lm_loss']:.4f} {experts} "
            f"flops/topk {record['flops_vs_topk']:.3f} lr {record['lr']:.2e}{grad} tok/s "
            f"{record['tokens_per_s']:.0f}{mfu} mem {record['peak_memory_mb']:.0f} MiB eta {eta:.0f}s")


def validation_line(metrics: dict, when: str) -> str:
    return (f"validation ({when}): loss {metrics['val_loss']:.4f} true experts/token "
            f"{metrics['val_true_experts_per_token']:.2f} flops/topk {metrics['val_flops_vs_topk']:.3f}")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)


class Trainer:
    """One run from a validated Config, torchtitan style: ``__init__`` is the setup (model, data, parallelism,
    optimizer, resume, output folder); ``fit`` repeats train_step / update routing state / log / validate /
    checkpoint and ends with ``finish`` (final validation, the whole model in one file).

    This class is pre-training and AdaMoE fine-tuning. Ada-K (train/adak.py ``AdaKTrainer``) overrides the model
    loading and preparation, the validation and ``fit`` (its warm-start and PPO stages) and shares the rest. The
    caller's Config is never modified: ``self.cfg`` is a copy with the model section the loaded model brought."""

    tensorboard = True  # Ada-K writes metrics.jsonl only

    def __init__(self, cfg: Config, ctx: ParallelContext, model: Optional[MoETransformer] = None):
        self.ctx = ctx
        self.engine_type = engine_class(cfg.parallel.engine)  # its class: facts and model preparation (engine.py)
        self.check_batch_layout(cfg)  # a bad config fails before any model is built
        torch.manual_seed(cfg.train.seed)
        built = model is None  # built here rank by rank (sharded, filled), or handed over whole (tests, notebooks)
        model = self.load_model(cfg) if built else model
        self.cfg = dataclasses.replace(cfg, model=model.config)  # a checkpoint or HF folder brings its architecture
        if cfg.train.seq_len > self.cfg.model.max_seq_len:
            raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds the model's "
                             f"max_seq_len={self.cfg.model.max_seq_len}")
        self.data = build_data(self.cfg, self.cfg.model.vocab_size, ctx.dp_rank, ctx.dp_size)
        self.model = self.prepare_model(model, built)
        self.out_dir = Path(cfg.train.out_dir)
        self.start_step = self.setup_optimizer()
        self.metrics = MetricsWriter(self.out_dir, enabled=ctx.is_main, resume_step=self.start_step,
                                     keep=self.kept_metrics())
        self.tb = TensorBoard(self.out_dir, self.tensorboard and cfg.train.tensorboard and ctx.is_main)
        if ctx.is_main:
            self.remove_crash_leftovers()  # this run owns out_dir now; nothing of it has been saved yet
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.routers = self.model.routers()  # one per MoE layer (dense-first layers have none)
        self.preemption = StopSignals()  # SIGTERM / SIGUSR1 while fit runs: stop at a step boundary
        self.log_start()

    def log_start(self) -> None:
        """The start banner (rank 0: the logger's filter): what this run is before its first step, as torchtitan
        and Megatron print it, so a wrong mesh, precision, router or data set shows before any time is spent."""
        ctx, m = self.ctx, self.cfg.model
        total, trainable = parameter_counts(self.model)
        logger.info(self.run_line())
        logger.info(f"mesh: dp {ctx.world_size // ctx.ep_size} x ep {ctx.ep_size} = world {ctx.world_size} "
                    f"({ctx.device.type}), engine {self.cfg.parallel.engine}, precision {self.precision_label()}")
        logger.info(f"model: {m.family}, {m.num_layers} layers, hidden {m.hidden_size}; parameters {_count(total)} "
                    f"total, {_count(trainable)} trainable ({100 * trainable / max(total, 1):.1f} %)")
        logger.info(router_line(self.cfg))
        for line in data_lines(self.cfg, self.data):
            logger.info(line)

    def kept_metrics(self):
        """Which records of a previous metrics.jsonl the run keeps: None = those up to start_step (MetricsWriter);
        Ada-K, whose two stages each count steps from 1, says it with a predicate."""
        return None

    def run_line(self) -> str:
        t = self.cfg.train
        resumed = f", resuming after step {self.start_step}" if self.start_step else ""
        return (f"run: {t.steps} steps of {t.batch_size} sequences x {t.seq_len} tokens, lr {t.lr:g} (warm-up "
                f"{t.warmup_steps}), log every {t.log_every}{resumed} -> {self.out_dir}")

    def precision_label(self) -> str:
        return ("bf16 compute, fp32 master weights" if bf16_compute(self.cfg, self.ctx.device) else "fp32")

    def remove_crash_leftovers(self) -> None:
        """The hidden temp files / folders a crash or a full disk left in out_dir (checkpoint staging, the HF
        export's temp and swapped-out folders, model.pt and metrics temp files): only our own temp names, never a
        user's file. Rank 0, once out_dir is this run's (the out_dir lock), before the first save."""
        removed = remove_stale_temporaries(self.out_dir)
        removed += remove_leftovers(self.out_dir, r"hf|metrics\.jsonl|config\.yaml|validation\.json")
        for name in ("final", "warm_start"):  # save_model_file's folders
            removed += remove_leftovers(self.out_dir / name, r"model\.pt")
        if removed:
            logger.info(f"removed {len(removed)} leftover temporary file(s)/folder(s) of an interrupted run: "
                        + ", ".join(str(p) for p in removed))

    # ------------------------------------------------------------------------------------------------------
    # setup (Ada-K overrides load_model, prepare_model, setup_optimizer and check_batch_layout)

    def check_batch_layout(self, cfg: Config) -> None:
        micro_rows = cfg.train.batch_size // self.ctx.dp_size
        if cfg.train.batch_size % self.ctx.dp_size or micro_rows % cfg.train.grad_accum_steps:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by data-parallel size "
                             f"{self.ctx.dp_size} x train.grad_accum_steps={cfg.train.grad_accum_steps}")

    def load_model(self, cfg: Config) -> MoETransformer:
        """The model, each rank materialising only its shards (train/build.py: LoRA, freezing and FSDP2 included)."""
        return build_job_model(cfg, self.ctx)

    def prepare_model(self, model: MoETransformer, built: bool = False) -> torch.nn.Module:
        """A model handed over whole: LoRA and freezing first. Then the engine's parallelism (Engine.prepare_model:
        FSDP2 shards a handed-over model, a built one has them from load_model; DeepSpeed's expert groups either
        way, it shards the whole module)."""
        if not built:
            apply_trainable(model, self.cfg)
            model.activation_checkpointing = self.cfg.train.activation_checkpointing
            model = model.to(self.ctx.device)
            apply_compile(model, self.cfg.train, self.ctx.device)  # as build_job_model: before the engine's FSDP2
        bf16 = bf16_compute(self.cfg, self.ctx.device)
        return self.engine_type.prepare_model(model, self.ctx, built=built,
                                              param_dtype=torch.bfloat16 if bf16 else None)

    def setup_optimizer(self) -> int:
        """AdamW and the LR schedule, restored with the data position from a checkpoint when resuming; returns the
        number of optimizer steps already taken."""
        t = self.cfg.train
        self.autocast = use_autocast(self.model, self.cfg, self.ctx.device)  # single process: autocast over fp32
        self.opt = build_optimizer(self.model, self.cfg, self.ctx.device)
        self.engine_type.split_param_groups(self.opt)  # e.g. DeepSpeed's MoE / non-MoE groups, before the schedule
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.cfg))
        self.engine = self.make_engine(self.opt, self.sched)
        self.budget = self.cfg.model.moe.target_true_experts is not None
        self.bad_steps = 0
        path = Path(t.resume_from) if t.resume_from else (latest_checkpoint(self.out_dir) if t.resume else None)
        if path is None:
            return 0
        check_resume(path, self.cfg, self.ctx)  # before loading: another shape would fail inside DCP
        wanted = optimizer_hparams(self.opt)  # this config's LR, betas, weight decay: the checkpoint's are old
        state = self.engine.load_checkpoint(path)
        self.sched.load_state_dict(state["scheduler"])
        reapply_hparams(self.opt, self.sched, wanted)
        self.data.train.load_state_dict(state["data"])
        self.bad_steps = state["bad_steps"]
        logger.info(f"resumed from {path} at step {state['step']}")
        return state["step"]

    def make_engine(self, opt: torch.optim.Optimizer, sched=None, params=None, accum: Optional[int] = None):
        """The engine the loop delegates to (train/engine.py; parallel.engine picks it: train/engine_registry.py)
        over the prepared model and ``opt`` (groups from Engine.split_param_groups). ``params``: what clipping
        covers (None: every parameter); ``accum``: micro-batches per step (default train.grad_accum_steps)."""
        return build_engine(self.cfg, self.ctx, self.model, opt, bf16=bf16_compute(self.cfg, self.ctx.device),
                            sched=sched, params=params,
                            accum=self.cfg.train.grad_accum_steps if accum is None else accum)

    # ------------------------------------------------------------------------------------------------------
    # the loop

    @handles_stop_signals
    def fit(self) -> dict:
        """Trains to train.steps; returns the last step's metrics plus the final validation figures."""
        t = self.cfg.train
        record: dict = {}
        t0 = time.perf_counter()
        self.model.train()
        for step in range(self.start_step + 1, t.steps + 1):  # step: optimizer steps done after this one
            step_record = self.train_step(step)
            if step_record is None:  # non-finite loss: skipped, counted, nothing else to report
                self.stop_if_preempted(step)
                continue
            record = step_record
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                record.update(self.validate())
            self.metrics.write(record)
            self.tb.write(record, step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                self.checkpoint(step)
            if step % t.log_every == 0 or step == t.steps:
                self.log_progress(record, step, t0)
            if "val_loss" in record:  # printed too, after its step's line: a user watches the console
                logger.info(validation_line(record, f"step {step}"))
            self.stop_if_preempted(step)
        return self.finish(record)

    def train_step(self, step: int) -> Optional[dict]:
        """One optimizer step over grad_accum_steps micro-batches, then the routing state updates; the step's
        metrics, or None when the loss was not finite on some rank and the step was skipped."""
        t, ctx = self.cfg.train, self.ctx
        start = time.perf_counter()
        inputs_all, targets_all = self.data.train.next_batch()
        scalars, acc = self.forward_backward(inputs_all, targets_all)
        if not math.isfinite(scalars[0]):
            self.skip_step(step, f"non-finite loss {scalars[0]}", scalars[0])
            return None
        # the global norm over every rank's gradient shards (torch's own clip_grad_norm_ in a single process); also
        # without clipping (max_norm inf scales by 1): it is the guard's one-number test of every gradient. A finite
        # loss can come with NaN/inf gradients, which AdamW would write into every weight it touches.
        grad_norm, stepped = self.engine.clip_and_step(t.grad_clip)  # clipping, optimizer step, LR schedule
        if not stepped:  # a non-finite norm: the same all-reduced value on every rank, one decision
            self.skip_step(step, f"non-finite gradient norm {float(grad_norm)}", scalars[0])
            return None
        # the updated state's check rides on the routing counts' all-reduce and host sync: no extra collective
        stats = acc.reduce(ctx, self.state_norm())
        if not math.isfinite(stats["state_norm"]) and not self.state_is_finite():
            # AdamW has already written it: no skip can undo that, and no further step or save can use it
            self.metrics.write({"step": step, "non_finite_state": True, "loss": scalars[0],
                                "grad_norm": float(grad_norm), "bad_steps": self.bad_steps})
            raise self.diverged(step, "the parameters or optimizer moments became non-finite in the optimizer step")
        update_routing_state(self.routers, stats, self.budget)
        elapsed = time.perf_counter() - start
        return self.step_record(step, scalars, stats, grad_norm, inputs_all.numel() * ctx.dp_size, elapsed)

    def forward_backward(self, inputs_all: torch.Tensor, targets_all: torch.Tensor
                         ) -> tuple[list[float], _RoutingAccumulator]:
        """Gradients of the step's loss (the mean over micro-batches); the loss terms as means over ranks (every
        rank sees the same values: one skip decision) and the routing counts of every micro-batch."""
        t, ctx = self.cfg.train, self.ctx
        acc = _RoutingAccumulator()
        sums = torch.zeros(5, device=ctx.device)  # loss, lm, aux, z, entropy (means over micro-batches)
        self.engine.zero_grad()
        micro = zip(inputs_all.chunk(t.grad_accum_steps), targets_all.chunk(t.grad_accum_steps))
        for i, (inputs, targets) in enumerate(micro):
            # fp32 master weights and optimizer state either way; routers' softmax and the LM loss stay in fp32
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits, plans = self.engine.forward(inputs.to(ctx.device), return_plans=True)
            lm = lm_loss(logits, targets.to(ctx.device))
            terms = routing_losses(plans, self.cfg.model.moe)
            loss = lm + terms["aux_loss"] + terms["z_loss"] + terms["entropy_loss"]
            self.engine.backward(loss, accum=t.grad_accum_steps, last=i == t.grad_accum_steps - 1)
            sums += torch.stack([loss, lm, terms["aux_loss"], terms["z_loss"], terms["entropy_loss"]]
                                ).detach().float() / t.grad_accum_steps
            acc.add(plans)
        # this rank's stop-signal vote rides on the same all-reduce (no extra collective per step): every rank
        # learns whether any rank got SIGTERM / SIGUSR1 and all stop after the same step (train/preemption.py)
        reduced = all_reduce_mean(torch.cat([sums, self.preemption.vote(ctx.device)]), ctx).tolist()
        self.preemption.agree(reduced[5])
        return reduced[:5], acc

    def skip_step(self, step: int, reason: str, loss: float) -> None:
        """A step whose loss or gradient norm was not finite on some rank: no optimizer step (the weights and moments
        stay the last good ones), counted; past train.max_bad_steps the run fails."""
        t = self.cfg.train
        if not self.engine.can_skip_steps:
            raise self.diverged(step, f"{reason}; parallel.engine: {self.cfg.parallel.engine} cannot skip a step (its "
                                      "gradients are already reduced into the engine's buffers)")
        self.bad_steps += 1
        self.engine.skip()  # drops the gradients; the schedule counts skipped steps too (same LR after a resume)
        logger.warning(f"step {step}: {reason}, step skipped ({self.bad_steps}/{t.max_bad_steps})")
        self.metrics.write({"step": step, "skipped": True, "reason": reason, "loss": loss,
                            "bad_steps": self.bad_steps})
        if self.bad_steps > t.max_bad_steps:
            raise self.diverged(step, f"{self.bad_steps} steps skipped for non-finite losses or gradients "
                                      f"(more than train.max_bad_steps={t.max_bad_steps}; check the data, or raise "
                                      "the limit)")
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            self.checkpoint(step)

    def step_record(self, step: int, scalars: list[float], stats: dict, grad_norm: Optional[torch.Tensor],
                    tokens: int, elapsed: float) -> dict:
        t, m = self.cfg.train, self.cfg.model
        per_layer = stats["true_experts_per_layer"]
        step_flops = 3 * forward_flops_per_token(m, per_layer, t.seq_len) * tokens
        record = {
            "step": step,
            "loss": scalars[0], "lm_loss": scalars[1], "aux_loss": scalars[2], "z_loss": scalars[3],
            "entropy_loss": scalars[4],
            "true_experts_per_token": sum(per_layer) / len(per_layer),
            "true_experts_per_layer": per_layer,
            "flops_vs_topk": flops_vs_topk(m, per_layer, t.seq_len),
            "tokens_per_s": tokens / elapsed,
            "tflops_per_device": step_flops / elapsed / self.ctx.world_size / 1e12,
            "lr": self.sched.get_last_lr()[0],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "drop_rate": stats["drop_rate"],
            "expert_imbalance": stats["expert_imbalance"],
            "rank_imbalance": stats["rank_imbalance"],
            "peak_memory_mb": _peak_memory_mb(self.ctx.device),
            "bad_steps": self.bad_steps,
        }
        if t.peak_tflops:
            record["mfu"] = record["tflops_per_device"] / t.peak_tflops
        if self.budget:
            record["null_bias_per_layer"] = [float(r.null_bias) for r in self.routers]
        return record

    def log_progress(self, record: dict, step: int, t0: float) -> None:
        t = self.cfg.train
        eta = (time.perf_counter() - t0) / (step - self.start_step) * (t.steps - step)
        logger.info(step_line(record, step, t.steps, eta, self.cfg.model.moe.target_true_experts))

    def stop_if_preempted(self, step: int) -> None:
        """After optimizer step ``step`` (taken or skipped): when a stop signal reached any rank (agreed in
        forward_backward's all-reduce), every rank writes the checkpoint of this step unless the periodic one just
        did, and the run ends with Preempted (exit code 0); the same command resumes from it (train/preemption.py)."""
        if not self.preemption.stop:
            return
        rank_log.info(f"rank {self.ctx.rank}: {self.preemption.reason()}: stopping after step {step}")
        latest = latest_checkpoint(self.out_dir)
        if latest is None or latest.name != f"step_{step:08d}":  # the periodic checkpoint may be this step's
            self.checkpoint(step)
            latest = latest_checkpoint(self.out_dir)
        logger.warning(f"stopped by {self.preemption.reason()} after step {step}/{self.cfg.train.steps}: checkpoint "
                       f"{latest}; the same command resumes from it (train.resume)")
        self.tb.close()
        raise Preempted(step, self.preemption.reason(), latest)

    def validate(self) -> dict:
        return evaluate(self.model, self.data, self.cfg, self.ctx.device)

    def state_tensors(self) -> list[torch.Tensor]:
        """This rank's trainable parameters and their optimizer moments (local shards), the guard's subject."""
        tensors = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state.get(p, {})
                tensors += [local_tensor(x.detach()) for x in (p, *(v for k, v in state.items()
                                                                    if k != "step" and torch.is_tensor(v)))]
        return tensors

    @torch.no_grad()
    def state_norm(self) -> torch.Tensor:
        """The L2 norm of this rank's state_tensors: one 0-d tensor on the device, no host sync; non-finite when
        an element is. Fused foreach norms (one read of the state, ~0.7 ms for the 1.3M values of the tiny config
        on CPU, where the infinity norm takes 25x longer). A sum of squares can also overflow from finite values
        beyond ~1e19; state_is_finite tells the two apart when this trips."""
        tensors = self.state_tensors()
        if not tensors:
            return torch.zeros((), device=self.ctx.device)
        return torch.nn.utils.get_total_norm(tensors, 2.0)

    @torch.no_grad()
    def state_is_finite(self) -> bool:
        """Collective, exact (element-wise), slow: run only after a non-finite state_norm, i.e. once in a run."""
        bad = sum(int(not torch.isfinite(t).all()) for t in self.state_tensors())
        return float(all_reduce_sum(torch.tensor(float(bad), device=self.ctx.device), self.ctx)) == 0

    def ensure_finite(self, step: int, what: str) -> None:
        """Collective: refuses (TrainingError) to let ``what`` be written from a non-finite state, whatever path
        led here (the loop, a signal handler, finish)."""
        value = float(all_reduce_sum(self.state_norm(), self.ctx))
        if not math.isfinite(value) and not self.state_is_finite():
            raise self.diverged(step, f"the parameters or optimizer moments are non-finite; {what} was not written")

    def diverged(self, step: int, what: str) -> TrainingError:
        """The error that ends a diverged run, naming the last good checkpoint (every checkpoint is good: none is
        written from a non-finite state, and retention keeps the newest)."""
        last = latest_checkpoint(self.out_dir)
        where = (f"the last good checkpoint is {last}: resume from it (train.resume_from) with a lower train.lr or "
                 "train.grad_clip" if last is not None else
                 "no checkpoint was written before: start again with a lower train.lr or train.grad_clip")
        return TrainingError(f"training diverged at step {step}: {what}; {where}")

    def checkpoint(self, step: int) -> None:
        """The resumable state (sharded over ranks: io/dcp_checkpoint.py); never from a non-finite state."""
        self.ensure_finite(step, f"checkpoint step_{step:08d}")
        self.engine.save_checkpoint(self.out_dir, step, {"scheduler": self.sched.state_dict(),
                                    "data": self.data.train.state_dict(), "bad_steps": self.bad_steps,
                                    "config": config_record(self.cfg, self.ctx)}, self.cfg.train.keep_last)

    def finish(self, record: dict) -> dict:
        """The last checkpoint, the final validation, the whole model in out_dir/final/model.pt (and hf/)."""
        t = self.cfg.train
        if self.start_step < t.steps:
            self.checkpoint(t.steps)
        final = self.validate()
        record.update(final)
        if final:
            self.metrics.write({"step": t.steps, **final})
            self.tb.write(final, t.steps)  # the final validation under val/ too
            logger.info(validation_line(final, "final"))
            if "val_true_experts_by_label" in final:
                logger.info("true experts by difficulty: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in final["val_true_experts_by_label"].items()))
        self.tb.close()
        self.ensure_finite(t.steps, "final/model.pt")  # also when this run only loaded a finished checkpoint
        path = self.save_model_file("final", t.steps, merge_lora=bool(t.lora_rank))
        logger.info(f"saved {path}")
        if self.ctx.is_main and t.export_hf:
            export_hf(path, self.out_dir / "hf")
            logger.info(f"exported {self.out_dir / 'hf'}")
        return record

    def save_model_file(self, name: str, step: int, merge_lora: bool = False) -> Path:
        """The whole model as out_dir/<name>/model.pt, written by rank 0 one tensor at a time as the ranks gather
        it (collective when distributed): no process holds the whole model (io/model_file.py save_model_stream)."""
        specs, tensors = self.engine.full_state_specs(), self.engine.iter_full_state()
        if merge_lora:  # the final model is a plain model
            specs, tensors = merge_lora_stream(specs, tensors, self.cfg.train.lora_alpha)
        path = self.out_dir / name / "model.pt"
        return save_model_stream(path, self.model.config, step, specs, tensors, write=self.ctx.is_main)


def train(cfg: Config, ctx: Optional[ParallelContext] = None) -> dict:
    """Trains as configured; returns the last step's metrics (plus validation figures). Without a ``ctx`` the
    process groups are created from the launch environment and torn down at the end. Rank 0 holds the out_dir
    lock for the whole run, taken before the process groups (a second run on the folder fails on every rank)."""
    with distributed(cfg.parallel, cfg.model.moe.num_experts, ctx, exclusive=OutDirLock(cfg.train.out_dir)) as ctx:
        trainer = Trainer(cfg, ctx)
        try:
            return trainer.fit()
        finally:
            trainer.engine.close()


def export_hf(model_path: Path, hf_dir: Path) -> None:
    """The final model as a Hugging Face folder, read from its model.pt one decoder layer at a time."""
    reader = ModelFileReader(model_path)
    to_hf_stream(reader.config, reader.specs, reader.get, hf_dir)
