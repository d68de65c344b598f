"""DeepSpeed as moe_train's training engine (parallel.engine: deepspeed; docs/deepspeed.md).

Our model, routers and variable-k all-to-all dispatcher run inside ``deepspeed.initialize``; DeepSpeed does the
backward bookkeeping, the gradient reduction (ZeRO stage 1 / 2 / 3), the clipping, the optimizer step (moe_train's
AdamW and LR schedule, handed over as client objects) and the checkpoints. The loop stays moe_train's
(train/trainer.py, train/adak.py through the engine interface of train/engine.py).

Expert parallelism (ep > 1), as deepspeed.moe does it:
  * each MoE layer keeps its expert shard and gets the AllToAllDispatcher (parallel/parallelize.py: shard_experts);
  * DeepSpeed's own expert groups are made with ``groups._create_expert_and_data_parallel(ep)``, named
    ``ep_size_<ep>``: ep groups of consecutive ranks, expert-data-parallel groups of the ranks holding the same shard,
    i.e. exactly our mesh (parallel/distributed.py; checked here);
  * every stacked expert tensor (base weights and LoRA adapters, trainable or frozen) is a DeepSpeed MoE parameter:
    ``param.allreduce = False``, ``param.group_name = "ep_size_<ep>"``: DeepSpeed broadcasts it within, and reduces
    its gradient over, the expert-data-parallel group, dividing by the data-parallel world size ("to maintain the
    gradients value unaffected by ep_size"), which is our scale: grad = (1/world) sum over all ranks
    (docs/parallel.md). Everything else is reduced over all ranks. The optimizer's parameter groups are split into
    MoE / non-MoE groups with DeepSpeed's split_params_into_different_moe_groups_for_optimizer;
  * DeepSpeed recognises a model with expert parameters by an instance of ``deepspeed.moe.layer.MoE`` among its
    modules; ``ExpertGroups`` (no parameters, no state) is that marker, attached to the model root when some
    expert parameter trains.
With ep = 1 the experts are ordinary data-parallel parameters (the expert-data-parallel group is the world).

Not supported, refused before training (config.py validate_engine, or here): ZeRO stage 3 with ep > 1 (DeepSpeed
refuses native MoE parameters under stage 3), ZeRO stage 3 with Ada-K routers (refuse_stage3_routers), a single process (DeepSpeed runs under a launcher; use fsdp, the same
math), a DeepSpeed JSON that sets what moe_train's own keys set. A non-finite loss ends the run (TrainingError from
the Trainer): DeepSpeed has reduced the step's gradients by then and offers no way to drop them (fsdp skips it).

Checkpoints: ``engine.save_checkpoint`` (model states, ZeRO partitions with the fp32 masters and AdamW moments, LR
schedule, step counters) inside moe_train's atomic, checksummed checkpoint folder (io/dcp_checkpoint.py:
step_X/deepspeed/, trainer.pt, rng_rank<r>.pt, manifest.json). At the same world size, ep and stage, DeepSpeed's own
load (bit-exact). DeepSpeed's native MoE checkpoint writes experts per expert module of ITS MoE class; ours are
stacked tensors, so expert weights are restored from the ZeRO fp32 partitions (trainable) or stay as built from
train.init_from (frozen; a resume checks that the config, init_from included, is the same: train/fingerprint.py),
never from rank 0's model-state file, which holds only rank 0's shard. Every save also writes a layout-free view
(io/deepspeed_view.py: per parameter under its full name, each rank its own fragments of the fp32 masters and AdamW
moments): a resume at another world size, ep or ZeRO stage reads its slices from it (_load_resharded).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import Config, deepspeed_json, deepspeed_stage
from moe_train.io.atomic import DiskWriteError, disk_errors, staging_folder, staging_path
from moe_train.io.dcp_checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_root,
    commit_checkpoint,
    file_records,
    restore_rng_state,
    save_rng_state,
    verify_checkpoint,
)
from moe_train.io.deepspeed_view import INDEX, VIEW, ViewError, check_view, load_view, read_index, write_view
from moe_train.parallel.dispatcher import AllToAllDispatcher
from moe_train.parallel.distributed import ParallelContext
from moe_train.parallel.parallelize import _global_aux_hook, moe_layers, shard_experts
from moe_train.parallel.state import _gather_full, expert_shards
from moe_train.train.engine import Engine

log = logging.getLogger(__name__)

TAG = "deepspeed"  # the DeepSpeed checkpoint's tag (sub-folder) inside a moe_train checkpoint folder


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("parallel.engine: deepspeed needs DeepSpeed: pip install 'moe_train[deepspeed]' "
                          "(deepspeed 0.19.8 is tested), or use parallel.engine: fsdp") from e
    return deepspeed


def init_comm(ctx: ParallelContext) -> None:
    """deepspeed.comm over the process groups moe_train made (parallel/distributed.py); it makes none itself."""
    import deepspeed.ops
    from deepspeed import comm

    if ctx.device.type == "cpu":
        # DeepSpeed's shared-memory CPU kernel serves only inference_all_reduce (not used in training) and is
        # JIT-compiled on first use (about 3 minutes on 2 cores): training collectives stay torch.distributed's (gloo)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    comm.init_distributed(dist_backend=ctx.backend, auto_mpi_discovery=False, verbose=False,
                          dist_init_required=False)


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert / expert-data-parallel groups of size ep (utils/groups.py)."""
    return f"ep_size_{ep}"


def engine_config(cfg: Config, ctx: ParallelContext, bf16: bool, accum: int) -> dict:
    """The DeepSpeed config: the user's JSON (deepspeed.config, validated in config.py) plus what moe_train owns
    (``accum``: micro-batches per optimizer step, train.grad_accum_steps; 1 for Ada-K, which does not accumulate)."""
    t = cfg.train
    user = deepspeed_json(cfg.deepspeed)
    stage = deepspeed_stage(cfg.deepspeed)
    zero = {**user.get("zero_optimization", {}), "stage": stage}
    if stage in (1, 2):  # DeepSpeed asserts both for models with expert parameters
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_scatter", True)
    return {
        **{"steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False}, **user,
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (ctx.dp_size * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
    }


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertGroups(MoE):
        """DeepSpeed's sign that a model has expert parameters (an instance of its MoE class); no parameters, no
        state, never called. The groups exist already (prepare_experts); DeepSpeed's per-expert checkpoint files
        are not used (num_local_experts = 0; module docstring)."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertGroups marks expert parameters for DeepSpeed; it is never called")

    return ExpertGroups


def prepare_experts(model: nn.Module, ctx: ParallelContext) -> list[nn.Parameter]:
    """Expert shards, all-to-all dispatchers and DeepSpeed's expert groups (ep > 1); returns the MoE parameters."""
    from deepspeed.utils import groups

    layers = moe_layers(model)
    if not layers:
        raise ValueError("parallel.engine: deepspeed found no MoELayer in the model")
    init_comm(ctx)
    E = layers[0].experts.num_experts
    for layer in layers:
        if ctx.global_aux_loss:
            layer.router.register_forward_hook(_global_aux_hook(ctx))
    if ctx.ep_size == 1:
        return []
    name = expert_group_name(ctx.ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ctx.ep_size)
    # DeepSpeed's layout must be our mesh's: ep groups of consecutive ranks, edp groups with one ep coordinate
    assert groups._get_expert_parallel_rank(name) == ctx.ep_rank, (groups._get_expert_parallel_rank(name), ctx)
    assert (dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name))
            == dist.get_process_group_ranks(ctx.edp_group))
    params = []
    for layer in layers:
        shard_experts(layer.experts, ctx.ep_rank, ctx.ep_size)
        layer.dispatcher = AllToAllDispatcher(ctx.ep_group, E, layer.dispatcher.permute_backend)
        for _, p in layer.experts.stacked_parameters():
            p.allreduce, p.group_name = False, name  # what deepspeed.moe's experts set (moe/experts.py)
            params.append(p)
    if any(p.requires_grad for p in params):
        model.add_module("deepspeed_expert_groups", _marker_class()(E, ctx.ep_size))
    return params


def refuse_stage3_routers(model: nn.Module) -> None:
    """Before deepspeed.initialize: ZeRO stage 3 cannot train Ada-K allocators. Their loss (warm start, PPO) reaches
    ``allocator.weight`` through the routing plan only, never through the MoE layer's output, so ZeRO-3's backward
    hooks (on module outputs) never gather the allocator for its gradient (register_router_parameters)."""
    if any(layer.router.learns_k for layer in moe_layers(model)):  # Ada-K allocators (routing/base.py)
        raise ValueError("parallel.engine: deepspeed with deepspeed.stage=3 cannot train Ada-K routers (the "
                         "allocators' loss bypasses the layer outputs ZeRO-3 gathers parameters on): use "
                         "deepspeed.stage=1 or 2 (the allocators are small: stage 3 saves nothing on them), or "
                         "parallel.engine: fsdp")


def register_router_parameters(model: nn.Module) -> None:
    """ZeRO-3 only, after deepspeed.initialize: every router parameter becomes an external parameter of its MoE layer.

    ZeRO-3 gathers a module's own parameters around that module's forward and backward only (from its hooks). The
    routers read some parameters outside their owning module's forward: the null / Ada-K routers concatenate
    ``gate.weight`` and ``null_gate.weight`` into ONE GEMM (bit-identical null twins, routing/null_experts.py), Ada-K
    reads ``allocator.weight`` in fp32, and the MoE layer's combine reads ``router.null_values`` (null_kind constant).
    Such a parameter was left partitioned (size 0) for its gradient: the first backward failed with "The size of
    tensor a (0) must match the size of tensor b (D)". As external parameters of the MoE layer they are gathered for
    the layer's forward and its backward (the layer's output carries the combine, which every router gradient flows
    through). Top-k and top-p call ``self.gate(x)``; registering their gate too is harmless (a gathered parameter
    stays gathered while any module using it is active)."""
    from deepspeed import zero

    for layer in moe_layers(model):
        for p in layer.router.parameters():
            zero.register_external_parameter(layer, p)


def split_moe_groups(opt: torch.optim.Optimizer) -> None:
    """In place, before any LR schedule wraps ``opt``: its parameter groups split into non-MoE and MoE groups
    (DeepSpeed's own splitter; MoE groups are named by their expert group and carry moe=True, as ZeRO requires).
    Same parameters, same hyperparameters per parameter."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [dict(g, name=f"group{i}") for i, g in enumerate(opt.param_groups)]
    groups_ = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
    opt.param_groups.clear()
    opt.param_groups.extend(groups_)


class DeepSpeedEngine(Engine):
    """The engine interface of train/engine.py over ``deepspeed.initialize`` (module docstring)."""

    name = "deepspeed"
    can_skip_steps = False  # the step's gradients are already reduced into ZeRO's buffers: no way to drop them
    dcp_checkpoints = False  # DeepSpeed's own files inside moe_train's checkpoint folder
    checkpoint_folder = TAG

    @classmethod
    def resume_advice(cls, state: Optional[dict], now: str) -> tuple[str, str, str]:
        stage = (state or {}).get("stage")
        return ("--set parallel.engine=deepspeed" + (f" --set deepspeed.stage={stage}" if stage else ""),
                f"DeepSpeed's ZeRO{f' stage {stage}' if stage else ''} partitions (its {TAG}/ folder), which "
                f"parallel.engine: {now} cannot read",
                "or continue its weights in a new run with train.init_from=<run>/final/model.pt (a DeepSpeed run "
                "writes it at the end; the optimizer state and data position then start afresh)")

    @classmethod
    def check_resume_layout(cls, path: Path, state: Optional[dict], world_size: int, ep_size: int) -> None:
        """Another world size or ep resumes from the layout-free view the saves write beside DeepSpeed's state
        (io/deepspeed_view.py); a checkpoint without it (written by an older moe_train) is refused, naming the
        layout that can resume it."""
        launch = ((state or {}).get("config") or {}).get("launch")
        if not launch or (launch["world_size"], launch["ep_size"]) == (world_size, ep_size):
            return
        if (Path(path) / VIEW / INDEX).is_file():
            return
        raise ValueError(
            f"cannot resume from {str(path)!r} at {world_size} ranks with parallel.ep={ep_size}: it was written by "
            f"{launch['world_size']} ranks with parallel.ep={launch['ep_size']} (ZeRO stage "
            f"{state.get('stage', '?')}) without the layout-free view (view/, written since moe_train's DeepSpeed "
            f"checkpoints reshard) that a DeepSpeed checkpoint needs to resume at another layout. Resume at "
            f"{launch['world_size']} ranks with parallel.ep={launch['ep_size']}, or continue its weights in a new "
            f"run with train.init_from=<run>/final/model.pt")

    @classmethod
    def expert_block(cls, num_experts: int, ctx: ParallelContext) -> Optional[tuple[int, int]]:
        return None  # every rank builds the whole model; prepare_experts keeps its shard after

    @classmethod
    def prepare_meta_model(cls, model: nn.Module, ctx: ParallelContext, param_dtype: Optional[torch.dtype]) -> None:
        check_whole_model_fits(model, ctx)  # DeepSpeed shards a whole module (deepspeed.initialize): nothing here

    @classmethod
    def prepare_model(cls, model: nn.Module, ctx: ParallelContext, *, built: bool,
                      param_dtype: Optional[torch.dtype] = None) -> nn.Module:
        # built or handed over, the model is whole: expert shards and groups here, the rest is DeepSpeed's (its bf16
        # mode is engine_config's; param_dtype is FSDP2's)
        check_launch(ctx)
        prepare_experts(model, ctx)
        return model

    @classmethod
    def autocasts(cls, model: nn.Module) -> bool:
        return False  # DeepSpeed's bf16 mode keeps the module in bf16 (fp32 masters in its optimizer): no casts

    @classmethod
    def split_param_groups(cls, opt: torch.optim.Optimizer) -> None:
        split_moe_groups(opt)

    @classmethod
    def create(cls, model: nn.Module, opt: torch.optim.Optimizer, cfg: Config, ctx: ParallelContext, *, bf16: bool,
               sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
               params: Optional[Sequence[nn.Parameter]] = None, accum: int = 1) -> DeepSpeedEngine:
        """``deepspeed.initialize`` around a model from prepare_model and an optimizer whose groups came from
        split_param_groups; DeepSpeed clips over every trainable parameter (``params`` are all of them)."""
        init_comm(ctx)
        return cls(model, opt, ctx, engine_config(cfg, ctx, bf16, accum), sched)

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, ctx: ParallelContext, ds_config: dict,
                 sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None):
        deepspeed = import_deepspeed()
        self.model, self.opt, self.sched, self.ctx = model, opt, sched, ctx
        self.stage = ds_config["zero_optimization"]["stage"]
        if self.stage == 3:
            refuse_stage3_routers(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=ds_config, dist_init_required=False)
        if self.stage == 3:
            register_router_parameters(model)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, accum: int = 1, last: bool = True) -> None:
        # engine.backward divides by its gradient_accumulation_steps (= train.grad_accum_steps; 1 for Ada-K); the
        # caller owns the boundary (one step() per optimizer step, after its last micro-batch): ZeRO reduces the
        # accumulated gradients in the backward of the boundary micro-batch
        assert accum == self.engine.gradient_accumulation_steps(), (accum, self.engine.gradient_accumulation_steps())
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def clip_and_step(self, max_norm: float) -> tuple[torch.Tensor, bool]:
        """DeepSpeed clips (gradient_clipping = train.grad_clip) and steps; returns its global gradient norm."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(math.nan if norm is None else float(norm)), True

    def skip(self) -> None:
        raise AssertionError("DeepSpeedEngine cannot skip a step (can_skip_steps is False)")

    def restart_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """As a fresh AdamW over the same parameters (Ada-K's second stage): the moments and step counts go. The
        optimizer deepspeed.initialize wrapped stays; ``opt`` has the same hyperparameters (the same builder)."""
        self.opt.state.clear()

    # ------------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """The end of the run (every rank, also after an error): DeepSpeed's hooks, buffers and GC setting released
        now, at the same point on every rank, instead of whenever the collector reaches the engine (a process that
        trains again, e.g. tests running several jobs, must not carry the old engine's hooks into the next)."""
        self.engine.destroy()
        gc.collect()

    # the full model and checkpoints

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: plain full fp32 tensors with the model's keys (trainable parameters from DeepSpeed's fp32
        masters, so a bf16 run exports its master weights; experts gathered over the ep group)."""

        return dict(self.iter_full_state())

    def full_state_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (full shape, dtype) as iter_full_state yields them (trainable parameters: fp32 masters)."""
        shards = expert_shards(self.model)
        out = {}
        for k, v in self.model.state_dict(keep_vars=True).items():
            shape = tuple(getattr(v, "ds_shape", v.shape))  # ZeRO-3 keeps the full shape beside an empty tensor
            if k in shards and self.ctx.ep_size > 1:
                shape = (shards[k].num_global, *shape[1:])
            trainable = isinstance(v, nn.Parameter) and v.requires_grad
            out[k] = (shape, torch.float32 if trainable else v.dtype)
        return out

    def iter_full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective, one tensor at a time. ZeRO-3 gathers each parameter for the moment it is copied out."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        shards = expert_shards(self.model)
        for k, v in self.model.state_dict(keep_vars=True).items():
            if isinstance(v, nn.Parameter) and v.requires_grad:
                full = safe_get_full_fp32_param(v)
                v = v if full is None else full
            elif isinstance(v, nn.Parameter):
                with zero.GatheredParameters([v], enabled=self.stage == 3):
                    v = v.detach().clone()
            yield k, _gather_full([(k, v.detach().clone())], shards, self.ctx)[k]

    def save_checkpoint(self, out_dir: Path, step: int, trainer_state: dict, keep_last: int,
                        trainable_only: bool = False) -> Path:
        """Collective: DeepSpeed's checkpoint (tag ``deepspeed``) inside moe_train's atomic checkpoint folder; a
        full disk or read-only folder is DiskWriteError naming it (io/atomic.py), the staging folder removed.
        ``trainable_only``: without the frozen parameters (DeepSpeed's exclude_frozen_parameters; Ada-K)."""
        final = checkpoint_root(out_dir) / f"step_{step:08d}"
        try:
            with disk_errors(final):
                return self._save_checkpoint(out_dir, final, step, trainer_state, keep_last, trainable_only)
        except DiskWriteError:
            if self.ctx.is_main:
                shutil.rmtree(staging_path(final), ignore_errors=True)
            raise

    def _save_checkpoint(self, out_dir: Path, final: Path, step: int, trainer_state: dict, keep_last: int,
                         trainable_only: bool = False) -> Path:
        tmp = staging_path(final)
        if self.ctx.is_main:
            staging_folder(final)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False, exclude_frozen_parameters=trainable_only)
        # beside it, what a resume at another world size / ep / stage reads (io/deepspeed_view.py)
        write_view(tmp, self.model, self.engine.optimizer, self.ctx, self.stage)
        save_rng_state(tmp, self.ctx)
        if self.ctx.is_main:
            torch.save({"format": FORMAT, "step": step, "engine": "deepspeed", "stage": self.stage,
                        **trainer_state}, tmp / "trainer.pt")
        dist.barrier()
        # rank 0 records every file (DeepSpeed decides which rank writes which; checkpoints need a shared folder)
        mine = file_records(tmp, sorted(p for p in tmp.rglob("*") if p.is_file())) if self.ctx.is_main else {}
        return commit_checkpoint(out_dir, tmp, final, step, mine, self.ctx, keep_last)

    def load_checkpoint(self, path: Path, trainable_only: bool = False) -> dict:
        """Collective: verifies the folder, loads DeepSpeed's state (same world size, ep and stage; else the
        layout-free view: _load_resharded), the RNG states.
        ``trainable_only``: a checkpoint saved without the frozen parameters, which keep their values."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
        manifest = verify_checkpoint(path)
        if not (path / TAG).is_dir():
            raise CheckpointError(f"checkpoint {str(path)!r} was not written by parallel.engine: deepspeed (no "
                                  f"{TAG}/ folder): resume it with the engine that wrote it")
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if ((manifest["world_size"], manifest["ep_size"]) != (self.ctx.world_size, self.ctx.ep_size)
                or trainer_state.get("stage", self.stage) != self.stage):
            return self._load_resharded(path, trainer_state)
        experts = set(expert_shards(self.model))
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad} if trainable_only else set()

        def load_non_experts(src: dict, dst: nn.Module) -> None:
            # the model-state file holds rank 0's expert shard only: experts come from the ZeRO partitions
            missing, unexpected = dst.load_state_dict({k: v for k, v in src.items() if k not in experts},
                                                      strict=False)
            assert not unexpected and set(missing) <= experts | frozen, (missing, unexpected)

        self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
                                    custom_load_fn=load_non_experts if experts or frozen else None)
        if experts and self.stage in (1, 2):
            self._experts_from_masters()
        restore_rng_state(path, self.ctx)
        return trainer_state

    def _load_resharded(self, path: Path, trainer_state: dict) -> dict:
        """A checkpoint of another world size, ep or ZeRO stage: from its layout-free view (io/deepspeed_view.py),
        each rank reading only its partitions' slices; refused before anything is loaded when the view cannot serve
        this launch. DeepSpeed's step counters follow the trainer's step; the RNG streams restart when the world
        size differs (as a resharded DCP resume)."""
        try:
            index = read_index(path)
            check_view(path, index, self.model, self.ctx)
        except ViewError as e:
            raise CheckpointError(f"{e} (this launch: {self.ctx.world_size} ranks, ep={self.ctx.ep_size}, "
                                  f"deepspeed.stage={self.stage})") from None
        load_view(path, index, self.model, self.engine.optimizer, self.ctx)
        step = trainer_state["step"]
        self.engine.global_steps, self.engine.global_samples = step, step * self.engine.train_batch_size()
        self.engine.skipped_steps = 0
        if index["world_size"] == self.ctx.world_size:
            restore_rng_state(path, self.ctx)
        return trainer_state


    @torch.no_grad()
    def _experts_from_masters(self) -> None:
        """After a ZeRO-1/2 load, the trainable expert parameters the module computes with are set from the restored
        fp32 masters: DeepSpeed 0.19.8 restores the masters but leaves the module's expert copies as they were
        (found by tests/test_deepspeed.py: resumed losses differed by ~1e-3 until this)."""
        from deepspeed.utils import safe_get_full_fp32_param

        experts = expert_shards(self.model)
        for name, p in self.model.named_parameters():  # the same order on every rank: matched collectives
            if name in experts and p.requires_grad:
                p.copy_(safe_get_full_fp32_param(p).to(p.dtype))


def check_launch(ctx: ParallelContext) -> None:
    """What the DeepSpeed engine needs from a launch, as a ValueError before any model is built."""
    if not ctx.distributed:
        raise ValueError("parallel.engine: deepspeed needs a distributed launch (torchrun, the deepspeed launcher, "
                         "mpirun or srun with WORLD_SIZE >= 2); for one process use parallel.engine: fsdp (the same "
                         "loop and math)")
    import_deepspeed()


def check_whole_model_fits(model: nn.Module, ctx: ParallelContext) -> None:
    """The DeepSpeed engine materialises the whole model on every rank before DeepSpeed partitions it (no zero.Init):
    refuse, before any allocation, a model whose fp32 copies on this node's ranks exceed the host's memory."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))  # torchrun's; else all on one host
    need = sum(p.numel() for p in model.parameters()) * 4 * ranks_here
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    if need > avail:
        raise ValueError(f"parallel.engine: deepspeed builds the whole model on every rank before DeepSpeed shards "
                         f"it: {need / 2**30:.1f} GiB for this node's {ranks_here} ranks in fp32, but "
                         f"{avail / 2**30:.1f} GiB of host memory is available; use parallel.engine: fsdp, which "
                         f"materialises each rank's shards only")
