"""The config a checkpoint was trained with, stored in it, and what a resume may change.

Every checkpoint's trainer.pt holds ``config_record(cfg, ctx)``: the resolved config (the model section is the
loaded model's) and the launch's world and expert-parallel sizes. A resume compares it key by key with the new
config (``check_resume``) before anything is loaded:

    MAY_CHANGE   takes effect and is logged: the LR and its schedule, the step count, cadences, clipping, the
                 non-finite limit, precision / activation checkpointing / kernels (how it computes, not what), the
                 launch (world and ep: DCP reshards the state, DeepSpeed reads its layout-free view
                 (io/deepspeed_view.py; refused up front without one); the RNG streams restart when the world differs),
                 the output and resume keys themselves, and the adak section (this trainer does not read it; Ada-K's
                 own list, train/adak.py ADAK_MAY_CHANGE, refuses its math).
    the rest     refused (ResumeConfigMismatch, exit code 2), every difference listed: the architecture, the
                 routing and its losses, LoRA and the trainable patterns, the data source, seq_len, the batch and
                 its accumulation, the seed, init_from. A checkpoint of another shape would not load; one of
                 another objective or data would silently become another experiment. ``train.resume_allow_changes``
                 (keys or sections, "*" for all) lets named differences through, logged as warnings.

A checkpoint written before fingerprints existed resumes with a warning that nothing could be checked; one written
before a config key existed counts as holding that key's default.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from moe_train.config import Config, to_dict
from moe_train.parallel.distributed import ParallelContext
from moe_train.routing.base import ALIASES
from moe_train.train.engine_registry import ENGINE_CLASSES, engine_class

log = logging.getLogger("moe_train.train")  # the trainer's logger: rank 0 only

# fnmatch patterns over flattened keys
MAY_CHANGE = (
    "train.steps", "train.lr", "train.schedule", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay",
    "train.beta1", "train.beta2", "train.grad_clip", "train.log_every", "train.checkpoint_every", "train.keep_last",
    "train.eval_every", "train.max_bad_steps", "train.peak_tflops", "train.tensorboard", "train.export_hf",
    "train.precision", "train.activation_checkpointing", "train.compile", "train.out_dir", "train.resume",
    "train.resume_from", "train.resume_allow_changes",
    "model.moe.gemm_backend", "model.moe.permute_backend", "model.moe.routing_backend",
    "parallel.*", "launch.*", "adak.*",
)


class ResumeConfigMismatch(ValueError):
    """A resume whose config differs from the checkpoint's in what the checkpoint means."""


def config_record(cfg: Config, ctx: ParallelContext) -> dict:
    """What is stored with each checkpoint."""
    return launch_record(cfg, ctx.world_size, ctx.ep_size)


def launch_record(cfg: Config, world_size: int, ep_size: int) -> dict:
    return {**to_dict(cfg), "launch": {"world_size": world_size, "ep_size": ep_size}}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _allowed_by(key: str, allow: list[str]) -> bool:
    return any(a == "*" or key == a or key.startswith(a + ".") for a in allow)


def read_stored_record(path: Path) -> Optional[dict]:
    """The config record in a checkpoint's trainer.pt; None when it has none or cannot be read yet (load_checkpoint
    then reports a missing or corrupted checkpoint with its own clear message)."""
    state = _read_trainer_state(path)
    return state.get("config") if state is not None else None


def _read_trainer_state(path: Path) -> Optional[dict]:
    try:
        state = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - verification in load_checkpoint names the problem properly
        return None
    return state if isinstance(state, dict) else None


def checkpoint_engine(path: Path, state: Optional[dict] = None) -> str:
    """The parallel.engine that wrote the checkpoint at ``path``: trainer.pt's ``engine`` (the DeepSpeed engine
    records it), else the engine whose own sub-folder it holds (Engine.checkpoint_folder), else the DCP engine
    (checkpoints from before the engine key were all FSDP's)."""
    if state is not None and state.get("engine"):
        return str(state["engine"])
    marked = [n for n, cls in ENGINE_CLASSES.items() if cls.checkpoint_folder and (Path(path) / cls.checkpoint_folder).is_dir()]
    return marked[0] if marked else next(n for n, cls in ENGINE_CLASSES.items() if cls.dcp_checkpoints)


def check_engine(path: Path, cfg: Config, state: Optional[dict] = None) -> None:
    """Refuses a resume under another engine than the one that wrote the checkpoint, naming that as the cause.

    The formats do not convert on load (FSDP: DCP shards with a .metadata file; DeepSpeed: ZeRO partitions in
    deepspeed/), so the key-by-key comparison would blame a side key (deepspeed.stage) and, with that allowed, the
    load would end in the other engine's traceback. Not overridable by train.resume_allow_changes: it cannot work."""
    state = _read_trainer_state(path) if state is None else state
    wrote, now = checkpoint_engine(path, state), cfg.parallel.engine
    if wrote == now:
        return
    how, what, other = engine_class(wrote).resume_advice(state, now)
    raise ResumeConfigMismatch(
        f"cannot resume from {str(path)!r}: it was written by parallel.engine: {wrote} and this launch uses "
        f"parallel.engine: {now}. The checkpoint holds {what}. Resume with the engine that wrote it ({how}), {other}")


def check_resume_layout(path: Path, cfg: Config, state: Optional[dict], world_size: int, ep_size: int) -> None:
    """The engine's own word on resuming its checkpoint at this launch's world size and ep (Engine.
    check_resume_layout: DCP reshards; DeepSpeed needs its layout-free view), before the model is built."""
    try:
        engine_class(cfg.parallel.engine).check_resume_layout(path, state, world_size, ep_size)
    except ValueError as e:
        raise ResumeConfigMismatch(str(e)) from None


def check_resume(path: Path, cfg: Config, ctx: ParallelContext,
                 may_change: tuple[str, ...] = MAY_CHANGE) -> dict[str, tuple[Any, Any]]:
    """Raises ResumeConfigMismatch listing every difference that matters (unless allowed); logs and returns the
    differences that take effect ({key: (checkpoint value, new value)}). ``may_change``: the job's MAY_CHANGE
    (Ada-K's, train/adak.py, reads the adak section and not the trainer's LR schedule)."""
    return check_resume_launch(path, cfg, ctx.world_size, ctx.ep_size, may_change=may_change)


def check_resume_launch(path: Path, cfg: Config, world_size: int, ep_size: int, log_changes: bool = True,
                        may_change: tuple[str, ...] = MAY_CHANGE, unknown: tuple[str, ...] = ()
                        ) -> dict[str, tuple[Any, Any]]:
    """check_resume for a launch of ``world_size`` ranks and ``ep_size`` before its process groups exist (the
    preflight: a checkpoint of another shape is refused before the model is built); ``log_changes`` False: the
    run's own check logs them later. ``unknown``: patterns of keys not resolved yet (the preflight's model section
    under train.init_from), left to the run's own check."""
    state = _read_trainer_state(path)
    check_engine(path, cfg, state)  # first: another engine's checkpoint is the cause, whatever else differs
    check_resume_layout(path, cfg, state, world_size, ep_size)
    stored = state.get("config") if state is not None else None
    if stored is None:
        if (Path(path) / "trainer.pt").is_file():
            log.warning(f"{path} holds no config fingerprint (written by an older version): the resume cannot "
                        "check that the config matches the checkpoint")
        return {}
    old, new = flatten(stored), flatten(launch_record(cfg, world_size, ep_size))
    # a router stored under its old name (router "null" before "null_experts") is the router it names
    if old.get("model.moe.router") in ALIASES:
        old["model.moe.router"] = ALIASES[old["model.moe.router"]]
    missing = object()
    # A key the checkpoint lacks was added to the config after it was written: the version that wrote it behaved as
    # the key's default (new keys default to the old behaviour), so only a non-default value now is a difference.
    defaults = flatten(to_dict(Config()))
    old.update({k: defaults[k] for k in new.keys() - old.keys() if k in defaults})
    diffs = {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
             if old.get(k, missing) != new.get(k, missing) and not any(fnmatch.fnmatchcase(k, p) for p in unknown)}

    def show(v):
        return "(absent)" if v is missing else repr(v)

    allow = list(cfg.train.resume_allow_changes)
    refused = {k: d for k, d in diffs.items()
               if not any(fnmatch.fnmatchcase(k, p) for p in may_change) and not _allowed_by(k, allow)}
    if refused:
        listed = "; ".join(f"{k}: {show(a)} in the checkpoint, {show(b)} now" for k, (a, b) in refused.items())
        keys = ", ".join(refused)
        raise ResumeConfigMismatch(
            f"cannot resume from {str(path)!r}: the config differs from the one it was trained with: {listed}. "
            f"Resume with the checkpoint's values, start afresh in another train.out_dir, or accept the change "
            f"explicitly with --set 'train.resume_allow_changes=[{keys}]' (keys or whole sections; [\"*\"] for any)")
    taken = {k: d for k, d in diffs.items() if k not in refused}
    forced = [k for k in taken if not any(fnmatch.fnmatchcase(k, p) for p in may_change)]
    if taken and log_changes:
        log.info(f"resuming {path} with changed settings (they take effect now): "
                 + ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in taken.items()))
    if forced and log_changes:
        log.warning(f"train.resume_allow_changes let through changes the checkpoint was not trained with: "
                    f"{', '.join(forced)}")
    return {k: (None if a is missing else a, None if b is missing else b) for k, (a, b) in taken.items()}


def optimizer_hparams(opt: torch.optim.Optimizer) -> list[dict]:
    """This config's per-group hyperparameters (call before loading a checkpoint, after the LR scheduler exists)."""
    return [{k: g[k] for k in ("initial_lr", "weight_decay", "betas") if k in g} for g in opt.param_groups]


def reapply_hparams(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, wanted: list[dict]
                    ) -> None:
    """After a resume: the optimizer's and scheduler's loaded states bring the old base LR, weight decay and
    betas (a changed train.lr was silently ignored); put this config's back and recompute the current LR with
    this config's schedule at the restored step. Unchanged settings give bit-identical values."""
    assert len(wanted) == len(opt.param_groups) == len(sched.lr_lambdas), (len(wanted), len(opt.param_groups))
    for group, w in zip(opt.param_groups, wanted):
        group.update(w)
    sched.base_lrs = [w["initial_lr"] for w in wanted]
    for group, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lam(sched.last_epoch)  # LambdaLR.get_lr's formula
    sched._last_lr = [group["lr"] for group in opt.param_groups]
