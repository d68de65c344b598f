"""The engine a training loop delegates to: forward, backward, clipping + optimizer step, checkpoints, the full model.

Two implementations, one interface, so the Trainer (train/trainer.py) and Ada-K (train/adak.py) have one loop:
    TorchEngine      moe_train's own: a torch optimizer and LR schedule over a plain or FSDP2 model
                     (parallel/parallelize.py), the global-norm clipping of parallel/collectives.py, DCP checkpoints
                     (io/dcp_checkpoint.py). parallel.engine: fsdp.
    DeepSpeedEngine  deepspeed.initialize around the same model (train/deepspeed_engine.py).
                     parallel.engine: deepspeed.
Interface (duck-typed):
    forward(*args, **kw)        the module call that the backward will go through
    zero_grad()
    backward(loss, accum=1, last=True)
                                one micro-batch's backward of loss / accum (the step's gradient is the mean over its
                                accum micro-batches); ``last``: the step's final micro-batch
    clip_and_step(max_norm)     (global grad norm, stepped); torch: a non-finite norm skips the step
    skip()                      drop this step's gradients (the non-finite guard); can_skip_steps says if it can
    save_checkpoint / load_checkpoint / full_state_dict
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from moe_train.io.dcp_checkpoint import load_checkpoint, save_checkpoint
from moe_train.parallel.collectives import clip_grad_norm_
from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.state import full_state_dict, full_state_specs, iter_full_state


class TorchEngine:
    """A torch optimizer (+ optional LR schedule) over ``model``; gradients reduced by FSDP2 when distributed."""

    can_skip_steps = True

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

    def save_checkpoint(self, out_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
        return save_checkpoint(out_dir, step, self.model, self.opt, trainer_state, self.ctx, keep_last)

    def load_checkpoint(self, path: Path) -> dict:
        return load_checkpoint(path, self.model, self.opt, self.ctx)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.model, self.ctx) if self.ctx.distributed else self.model.state_dict()

    def full_state_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return full_state_specs(self.model, self.ctx)

    def iter_full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: the full tensors one at a time, in full_state_specs' order (a streamed save)."""
        return iter_full_state(self.model, self.ctx)
