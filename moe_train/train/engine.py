"""The engine a training loop delegates to: model preparation, forward, backward, clipping + optimizer step,
checkpoints, the full model. ``Engine`` is the interface; each engine is one subclass, found by its parallel.engine
name in train/engine_registry.py (``engine_class``, ``build_engine``), so the Trainer (train/trainer.py), Ada-K
(train/adak.py) and the model build (train/build.py) contain no engine branch:
    TorchEngine      moe_train's own: a torch optimizer and LR schedule over a plain or FSDP2 model
                     (parallel/parallelize.py), the global-norm clipping of parallel/collectives.py, DCP checkpoints
                     (io/dcp_checkpoint.py). parallel.engine: fsdp.
    DeepSpeedEngine  deepspeed.initialize around the same model (train/deepspeed_engine.py).
                     parallel.engine: deepspeed.
A run asks the CLASS first (the optimizer is built from the prepared model, before any engine exists):
    facts                       can_skip_steps, dcp_checkpoints, facts() (config.ENGINE_FACTS: what the layers
                                below train/ know, e.g. fsdp2 for parallel/layout.py)
    expert_block, prepare_meta_model
                                train/build.py: which experts a rank materialises; the sharding (or checks) on the
                                meta model before each rank allocates
    prepare_model               after materialisation: the model the optimizer and the loop see
    autocasts                   whether a bf16 run's loop autocasts (else the engine computes in bf16 itself)
    split_param_groups          the optimizer's parameter groups as the engine needs them
    create                      the engine of a run (build_engine(cfg, ctx, ...) calls it)
then the INSTANCE, per step and per checkpoint:
    forward(*args, **kw)        the module call that the backward will go through
    zero_grad()
    backward(loss, accum=1, last=True)
                                one micro-batch's backward of loss / accum (the step's gradient is the mean over its
                                accum micro-batches); ``last``: the step's final micro-batch
    clip_and_step(max_norm)     (global grad norm, stepped); torch: a non-finite norm skips the step
    skip()                      drop this step's gradients (the non-finite guard); can_skip_steps says if it can
    restart_optimizer(opt)      a fresh optimizer over the same parameters (Ada-K's second stage)
    save_checkpoint / load_checkpoint
                                trainable_only=True: the checkpoint leaves the frozen parameters out (Ada-K's
                                frozen base comes from train.init_from again on resume)
    full_state_dict / full_state_specs / iter_full_state
                                the whole model as plain full tensors (final/model.pt)
    close()                     the end of the run, on every rank
Adding an engine: one module with a subclass of Engine (no abstract method left), one line in ENGINE_CLASSES
(train/engine_registry.py) and its row in config.ENGINE_FACTS (which makes its name a valid parallel.engine);
tests/test_engine_registry.py checks the three agree.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from moe_train.config import ENGINE_FACTS, Config, EngineFacts
from moe_train.io.dcp_checkpoint import load_checkpoint, save_checkpoint
from moe_train.parallel.collectives import clip_grad_norm_
from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.parallelize import parallelize_model
from moe_train.parallel.state import full_state_dict, full_state_specs, iter_full_state


class Engine(abc.ABC):
    """The interface of a training engine (module docstring). Class attributes and classmethods are what a run
    needs before the engine exists; an instance (``create``) runs the steps and checkpoints of one run."""

    name: ClassVar[str]  # its parallel.engine value: a key of config.ENGINE_FACTS and of ENGINE_CLASSES
    # skip() can drop a step's reduced gradients (the Trainer's non-finite guard); else a non-finite step ends the run
    can_skip_steps: ClassVar[bool]
    # its checkpoints are DCP folders that one process reloads at any layout (`moe-train export` of a checkpoint)
    dcp_checkpoints: ClassVar[bool]
    # a sub-folder only this engine's checkpoints hold (how a checkpoint without trainer.pt's "engine" key is told
    # apart); None: the DCP layout, the format of checkpoints written before that key existed
    checkpoint_folder: ClassVar[Optional[str]] = None

    @classmethod
    @abc.abstractmethod
    def resume_advice(cls, state: Optional[dict], now: str) -> tuple[str, str, str]:
        """For a checkpoint this engine wrote (``state``: its trainer.pt) that a run of engine ``now`` tries to
        resume: (the --set flags that resume it, what it holds that ``now`` cannot read, the other way on)."""

    @classmethod
    def check_resume_layout(cls, path: Path, state: Optional[dict], world_size: int, ep_size: int) -> None:
        """Before the model is built: raise ValueError if this engine cannot resume its checkpoint at ``path``
        at this launch's layout. Default: any layout (DCP reshards)."""
        return None

    model: nn.Module
    opt: torch.optim.Optimizer
    ctx: ParallelContext

    @classmethod
    def facts(cls) -> EngineFacts:
        """The facts layers below train/ read from config.ENGINE_FACTS (one owner), e.g. fsdp2."""
        return ENGINE_FACTS[cls.name]

    # ------------------------------------------------------------------------------------------------------
    # model preparation (before the engine exists)

    @classmethod
    @abc.abstractmethod
    def expert_block(cls, num_experts: int, ctx: ParallelContext) -> Optional[tuple[int, int]]:
        """The experts [lo, hi) each rank of a distributed launch materialises in train/build.py (None: all)."""

    @classmethod
    @abc.abstractmethod
    def prepare_meta_model(cls, model: nn.Module, ctx: ParallelContext, param_dtype: Optional[torch.dtype]) -> None:
        """train/build.py step 4 on a distributed launch, in place, on the meta model before each rank allocates:
        the sharding (or the checks) that must come before ``to_empty``. ``param_dtype``: bf16 compute (None: the
        parameters' dtype)."""

    @classmethod
    @abc.abstractmethod
    def prepare_model(cls, model: nn.Module, ctx: ParallelContext, *, built: bool,
                      param_dtype: Optional[torch.dtype] = None) -> nn.Module:
        """After materialisation, before the optimizer is built from its parameters: the model the loop runs.
        ``built``: by train/build.py (prepare_meta_model ran), else handed over whole, the same on every rank."""

    @classmethod
    @abc.abstractmethod
    def autocasts(cls, model: nn.Module) -> bool:
        """Whether a bf16 run's loop computes under torch.autocast over ``model`` (False: the engine's own bf16)."""

    @classmethod
    @abc.abstractmethod
    def split_param_groups(cls, opt: torch.optim.Optimizer) -> None:
        """In place, before an LR schedule wraps ``opt``: the parameter groups this engine needs (same parameters and
        hyperparameters per parameter)."""

    @classmethod
    @abc.abstractmethod
    def create(cls, model: nn.Module, opt: torch.optim.Optimizer, cfg: Config, ctx: ParallelContext, *, bf16: bool,
               sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
               params: Optional[Sequence[nn.Parameter]] = None, accum: int = 1) -> Engine:
        """The engine of a run over the prepared ``model`` and ``opt`` (+ ``sched``, stepped with it). ``bf16``:
        train.precision resolved; ``params``: what clipping covers (None: every parameter); ``accum``:
        micro-batches per optimizer step."""

    # ------------------------------------------------------------------------------------------------------
    # one optimizer step

    @abc.abstractmethod
    def forward(self, *args, **kwargs):
        """The module call that the backward will go through."""

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, accum: int = 1, last: bool = True) -> None:
        """One micro-batch's backward of loss / accum; ``last``: the step's final micro-batch."""

    @abc.abstractmethod
    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor, bool]:
        """Clips to ``max_norm`` (0: no clipping) and steps; returns (global gradient norm, stepped)."""

    @abc.abstractmethod
    def skip(self) -> None:
        """Drops this step's gradients (only called when can_skip_steps)."""

    @abc.abstractmethod
    def restart_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """From here on as a fresh ``opt`` over the same parameters (no moments, no step counts): Ada-K's stages."""

    @abc.abstractmethod
    def close(self) -> None:
        """The end of the run (every rank, also after an error): what the engine holds beyond the model and the
        optimizer is released."""

    # ------------------------------------------------------------------------------------------------------
    # checkpoints and the full model

    @abc.abstractmethod
    def save_checkpoint(self, out_dir: Path, step: int, trainer_state: dict, keep_last: int,
                        trainable_only: bool = False) -> Path:
        """Collective: the resumable state under out_dir/checkpoints/step_<step>; returns its folder."""

    @abc.abstractmethod
    def load_checkpoint(self, path: Path, trainable_only: bool = False) -> dict:
        """Collective: restores what save_checkpoint wrote; returns its trainer_state (with ``step``)."""

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model as plain full tensors, the model's keys."""

    @abc.abstractmethod
    def full_state_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (full shape, dtype) as iter_full_state yields them."""

    @abc.abstractmethod
    def iter_full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: the full tensors one at a time, in full_state_specs' order (a streamed save)."""


class TorchEngine(Engine):
    """A torch optimizer (+ optional LR schedule) over ``model``; gradients reduced by FSDP2 when distributed."""

    name = "fsdp"
    can_skip_steps = True
    dcp_checkpoints = True

    @classmethod
    def resume_advice(cls, state: Optional[dict], now: str) -> tuple[str, str, str]:
        return (f"--set parallel.engine={cls.name}",
                f"a DCP checkpoint (FSDP shards and .metadata), which parallel.engine: {now} cannot read",
                "or convert it with `moe-train export --checkpoint <this folder> --dst <hf folder>` and start a new "
                "run from the export with train.init_from (the optimizer state and data position then start afresh)")

    @classmethod
    def expert_block(cls, num_experts: int, ctx: ParallelContext) -> Optional[tuple[int, int]]:
        if ctx.ep_size == 1:
            return None
        per = num_experts // ctx.ep_size  # parallelize_model's split: consecutive blocks over ep
        return ctx.ep_rank * per, (ctx.ep_rank + 1) * per

    @classmethod
    def prepare_meta_model(cls, model: nn.Module, ctx: ParallelContext, param_dtype: Optional[torch.dtype]) -> None:
        parallelize_model(model, ctx, param_dtype=param_dtype)  # expert shards + FSDP2: each rank allocates its own

    @classmethod
    def prepare_model(cls, model: nn.Module, ctx: ParallelContext, *, built: bool,
                      param_dtype: Optional[torch.dtype] = None) -> nn.Module:
        # bf16: FSDP2's MixedPrecisionPolicy (bf16 all-gather and compute, fp32 gradient reduction), as torchtitan;
        # a single process keeps the model (parallelize_model returns it) and autocasts
        return model if built else parallelize_model(model, ctx, param_dtype=param_dtype)

    @classmethod
    def autocasts(cls, model: nn.Module) -> bool:
        # an FSDP2 model computes in bf16 through its MixedPrecisionPolicy; autocast over it would all-gather fp32
        # and cast per op
        return not isinstance(model, FSDPModule)

    @classmethod
    def split_param_groups(cls, opt: torch.optim.Optimizer) -> None:
        pass  # build_optimizer's decay / no-decay groups serve FSDP2 as they are

    @classmethod
    def create(cls, model: nn.Module, opt: torch.optim.Optimizer, cfg: Config, ctx: ParallelContext, *, bf16: bool,
               sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
               params: Optional[Sequence[nn.Parameter]] = None, accum: int = 1) -> TorchEngine:
        return cls(model, opt, ctx, sched, params)  # bf16 and accum are the loop's (autocast, loss / accum)

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, ctx: ParallelContext,
                 sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 params: Optional[Sequence[nn.Parameter]] = None):
        self.model, self.opt, self.sched, self.ctx = model, opt, sched, ctx
        self.params = params  # what clipping covers (None: every parameter of the model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, accum: int = 1, last: bool = True) -> None:
        (loss / accum).backward()

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor, bool]:
        """Clips to ``max_norm`` (0 = no clipping, the norm is still computed: it is the non-finite guard's test)
        and steps; a non-finite global norm returns (norm, False) without stepping."""
        params = self.model.parameters() if self.params is None else self.params
        norm = clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, self.ctx)
        if not math.isfinite(float(norm)):
            return norm, False
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return norm, True

    def skip(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()  # the schedule counts skipped steps too: a resumed run lands on the same LR

    def restart_optimizer(self, opt: torch.optim.Optimizer) -> None:
        assert self.sched is None, "an LR schedule is bound to the previous optimizer"
        self.opt = opt

    def save_checkpoint(self, out_dir: Path, step: int, trainer_state: dict, keep_last: int,
                        trainable_only: bool = False) -> Path:
        return save_checkpoint(out_dir, step, self.model, self.opt, trainer_state, self.ctx, keep_last,
                               trainable_only)

    def load_checkpoint(self, path: Path, trainable_only: bool = False) -> dict:
        return load_checkpoint(path, self.model, self.opt, self.ctx, trainable_only)

    def close(self) -> None:
        """The end of the run (every rank, also after an error): nothing to release; the model and optimizer are
        the caller's."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model, self.ctx) if self.ctx.distributed else self.model.state_dict()

    def full_state_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return full_state_specs(self.model, self.ctx)

    def iter_full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: the full tensors one at a time, in full_state_specs' order (a streamed save)."""
        return iter_full_state(self.model, self.ctx)
