"""Every input of a training job checked before any work (issue 17): the one call the command line makes between
loading the config (moe_train/config.py validates it) and making process groups and the model.

    launch       WORLD_SIZE / RANK / ep layout / parallel.world_size, MASTER_PORT already taken on this host
    model source train.init_from: a model.pt or a Hugging Face folder checked without reading weights
                 (moe_train/io/load.py check_any), the AdaMoE conversion on load against the source's config
    resume       train.resume_from is a complete checkpoint folder
    out_dir      a folder that can be written; a finished run (final/) is not trained over by accident; free disk
                 for one checkpoint (parameters + optimizer state, from the model's parameter count)
    export       train.export_hf: the Hugging Face family can express the trained model (the exporter's own check
                 on a meta-device model), else the refusal would only come after the whole run
    data         moe_train/data/preflight.py (files, UTF-8, fields, token range, enough tokens)
Each failure is a ValueError naming the key, the value, what is allowed and the fix; the command line prints it as
one line and exits 2. When everything passes, the MARKER line is logged (the mistakes campaign, bench/mistakes.py,
tells an early error from a late one by it).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Mapping, Optional

import torch

from moe_train.config import Config, ModelConfig
from moe_train.data.preflight import preflight_data
from moe_train.io.convert import check_conversion
from moe_train.io.dcp_checkpoint import MANIFEST, latest_checkpoint
from moe_train.io.hf_config import config_to_hf
from moe_train.io.hf_weights import export_state_dict
from moe_train.io.load import check_any
from moe_train.model import MoETransformer
from moe_train.parallel.distributed import _env_int, validate_layout
from moe_train.parallel.layout import validate_fsdp_config
from moe_train.routing.registry import conversions_on_load, router_class
from moe_train.train.adak import ADAK_MAY_CHANGE
from moe_train.train.fingerprint import MAY_CHANGE, check_resume_launch
from moe_train.train.metrics import logger

MARKER = "inputs checked"


def check_launch(cfg: Config, env: Mapping[str, str]) -> None:
    """The launch environment against the config, as init_distributed will read it (no process group is made)."""
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    p = cfg.parallel
    validate_layout(world, p.ep, cfg.model.moe.num_experts)
    if p.world_size is not None and world != p.world_size:
        raise ValueError(f"WORLD_SIZE={world} but this config is written for parallel.world_size={p.world_size} "
                         f"ranks (dp {p.world_size // p.ep} x ep {p.ep}): launch {p.world_size} processes, "
                         f"add --miniature to try the layout on this machine, or --set parallel.world_size=null "
                         f"to run at another size")
    if world > 1:
        if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun, or "
                             "export MASTER_ADDR (host of rank 0) and MASTER_PORT (a free port) together with RANK, "
                             "WORLD_SIZE and LOCAL_RANK")
        check_master_port(env, rank)


def check_master_port(env: Mapping[str, str], rank: int) -> None:
    """Rank 0 of a launch without torchrun hosts the rendezvous at MASTER_ADDR:MASTER_PORT: when another process
    already listens there on this host, the ranks would meet that process's job (or wait for it to end) instead of
    failing. Under torchrun the agent holds the port itself, so nothing is checked."""
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if rank != 0 or not addr or not port or env.get("TORCHELASTIC_USE_AGENT_STORE"):
        return  # missing values are reported by the rendezvous itself
    try:
        port_i = int(port)
    except ValueError:
        raise ValueError(f"MASTER_PORT={port!r} must be an integer port") from None
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
    if addr not in local:
        try:
            local.add(socket.gethostbyname(socket.gethostname()))
        except OSError:
            pass
        if addr not in local:
            return  # rank 0 on another host's address: that host's business
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no obstacle
        try:
            s.bind(("" if addr == "0.0.0.0" else addr, port_i))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"MASTER_PORT={port_i} is already in use on this host ({addr}) by another process "
                                 f"(another job's rendezvous?): export another free MASTER_PORT for this launch "
                                 f"(every rank the same), or stop the other job") from None


def check_model_source(cfg: Config, adak: bool = False) -> ModelConfig:
    """The architecture the run will train: train.init_from's (checked without reading weights) or model's."""
    t, want = cfg.train, cfg.model.moe
    if t.init_from is None:
        if adak:
            raise ValueError("Ada-K trains allocators on a pretrained model: set train.init_from to a moe_train "
                             "model file (model.pt) or a Hugging Face folder")
        return cfg.model

    src = check_any(t.init_from, "train.init_from")
    have = src.moe
    if not adak and want.router != have.router:
        target = router_class(want.router)
        if have.router not in target.converts_from:
            raise ValueError(f"model.moe.router={want.router!r} but train.init_from={t.init_from!r} holds a "
                             f"{have.router!r} model; only {conversions_on_load()} are done on load")
        if target.ranks_null_experts:  # the AdaMoE conversion adds null experts: its arguments, before any work
            try:
                check_conversion(have, want.num_null_experts, want.top_k, want.baseline_top_k, want.null_tie_break,
                                 want.null_kind)
            except ValueError as e:
                raise ValueError(f"train.init_from={t.init_from!r} is a top-k model converted to null experts on "
                                 f"load with model.moe: {e}") from None
    if t.seq_len > src.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds the max_seq_len={src.max_seq_len} of "
                         f"train.init_from={t.init_from!r}: lower train.seq_len")
    return src


def check_resume_from(cfg: Config) -> None:
    path = cfg.train.resume_from
    if path is None:
        return

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"train.resume_from={path!r} does not exist; give a checkpoint folder such as "
                         f"<out_dir>/checkpoints/step_00000100")
    if not (p / MANIFEST).is_file():
        raise ValueError(f"train.resume_from={path!r} is not a complete checkpoint (no {MANIFEST}: not a checkpoint "
                         f"folder, or its save never finished); give a folder <out_dir>/checkpoints/step_N")


def check_resume_config(cfg: Config, model_cfg: ModelConfig, world_size: int, adak: bool = False) -> None:
    """The checkpoint a run will resume from (train.resume_from, or out_dir's latest with train.resume) against
    this config, as the trainer (or Ada-K) checks it after loading its model (train/fingerprint.py): a checkpoint
    of another model shape, engine, objective or Ada-K setting is refused here, before the model is built. With
    train.init_from the model section is the source's plus the conversion's knobs (resolved only when the model
    is built): the run's own check compares that section then."""
    t = cfg.train
    path = Path(t.resume_from) if t.resume_from else (latest_checkpoint(Path(t.out_dir)) if t.resume else None)
    if path is None:
        return
    check_resume_launch(path, dataclasses.replace(cfg, model=model_cfg), world_size, cfg.parallel.ep,
                        log_changes=False, may_change=ADAK_MAY_CHANGE if adak else MAY_CHANGE,
                        unknown=("model.*",) if t.init_from is not None else ())


def _checkpoint_step(folder: Optional[Path]) -> Optional[int]:
    try:
        return int(folder.name.split("_", 1)[1]) if folder is not None else None
    except (IndexError, ValueError):
        return None


def check_out_dir(cfg: Config, overwrite: bool = False) -> None:
    """train.out_dir can be written, and a finished run there is not trained over unless the config extends it
    (a resume with a larger train.steps) or ``overwrite`` says so."""
    t = cfg.train
    out = Path(t.out_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"train.out_dir={t.out_dir!r} cannot be made: {str(probe)!r} is a file, not a folder; "
                         f"choose another train.out_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir={t.out_dir!r} cannot be written: {str(probe)!r} is not writable by this "
                         f"user; choose another train.out_dir or fix its permissions")
    final = out / "final" / "model.pt"
    if overwrite or not final.is_file():
        return

    at = _checkpoint_step(Path(t.resume_from)) if t.resume_from else (
        _checkpoint_step(latest_checkpoint(out)) if t.resume else None)
    if at is not None and at < t.steps:
        return  # a resume that extends the finished run
    done = f" at step {at}" if at is not None else ""
    raise ValueError(f"train.out_dir={t.out_dir!r} already holds a finished run (final/model.pt{done}); training "
                     f"again would overwrite it. To continue it raise train.steps above {at if at else 'its steps'} "
                     f"(it resumes from the last checkpoint), choose another train.out_dir, or pass --overwrite to "
                     f"replace it")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(cfg: Config, model: MoETransformer, adak: bool = False) -> None:
    """train.out_dir's filesystem has room for one checkpoint, a lower bound from the parameter count: fp32
    weights + AdamW's two fp32 moments for what trains, 2 bytes (bf16) for a frozen weight. A full disk would
    otherwise be found at the first save, after the time the steps took."""
    t = cfg.train
    total = sum(p.numel() for p in model.parameters())
    trains_all = not (adak or t.lora_rank or t.trainable)  # else a part trains: count none (a lower bound)
    need = total * 12 if trains_all else total * 2
    probe = _existing_parent(Path(t.out_dir))
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ValueError(f"train.out_dir={t.out_dir!r}: {free / 2**30:.2f} GiB free on its filesystem ({str(probe)!r}) "
                         f"but one checkpoint of this {total / 1e9:.2f} B-parameter model needs at least "
                         f"{need / 2**30:.2f} GiB (weights + optimizer state): free space or choose another "
                         f"train.out_dir")


def check_export_hf(cfg: Config, model: MoETransformer) -> None:
    """train.export_hf: the exporter's own expressibility check (config.json and the weight layout of the family,
    moe_train/io/hf.py to_hf_stream) on the model to train, built on the meta device: a family that cannot
    express it (Mixtral with norm_topk_prob false, a Qwen3 shared expert, ...) is refused before the run."""
    if not cfg.train.export_hf:
        return
    try:
        config_to_hf(model.config, torch.float32)
        export_state_dict(model)
    except ValueError as e:
        raise ValueError(f"train.export_hf: true, but the trained model cannot be exported: {e} (or set "
                         f"train.export_hf: false; final/model.pt is written either way)") from None


def check_train_inputs(cfg: Config, env: Optional[Mapping[str, str]] = None, overwrite: bool = False,
                       adak: bool = False) -> ModelConfig:
    """Every check above, in the order a user fixes things; returns the architecture that will be trained.
    ``env``: the launch environment (None: not checked, e.g. the caller made the process groups)."""
    if env is not None:
        check_launch(cfg, env)
    model_cfg = check_model_source(cfg, adak)
    if env is not None:  # the widths FSDP2 shards: the model that will be trained, at the launched world size
        validate_fsdp_config(cfg, _env_int(env, "WORLD_SIZE", 1), model_cfg)
    check_resume_from(cfg)
    check_out_dir(cfg, overwrite)
    if env is not None:
        check_resume_config(cfg, model_cfg, _env_int(env, "WORLD_SIZE", 1), adak)
    with torch.device("meta"):  # shapes only, no memory: the parameter count and the export's layout
        skeleton = MoETransformer(model_cfg)
    if not adak:  # Ada-K writes no Hugging Face folder
        check_export_hf(cfg, skeleton)
    check_disk_space(cfg, skeleton, adak)
    preflight_data(cfg, model_cfg.vocab_size)
    logger.info(f"{MARKER}: config, launch, model source, out_dir and data; building the model")
    return model_cfg
