"""Miniatures: any config at its real parallel layout with tiny dimensions, to check a job before launch.

A 16-GPU Mixtral-8x22B job and its miniature share everything that decides whether the job works: the world size
and mesh (dp x ep), the experts, null experts, k and router conventions, LoRA and the trainable patterns, the
precision, activation checkpointing, gradient accumulation, the global batch and its micro-batches, capacity, the
compute budget, the checkpoint cadence, the HF export and the Ada-K stages. Only sizes shrink: hidden and FFN
widths, layers, vocabulary, sequence length and the number of steps. What the miniature cannot read is replaced:

  train.init_from  a random model of the same family (read from the real folder's config.json when it is there,
                   else from the config's model section), written in the same format (HF folder or model.pt);
  data             the generated difficulty-labelled corpus (in memory).

    moe-train train --config configs/mixtral_8x22b_adamoe.yaml --miniature     # spawns 16 gloo ranks on CPU
    torchrun --nproc-per-node 16 -m moe_train.cli train --config ... --miniature   # or under any launcher

``--set`` overrides apply to the real config and again to the miniature, so an explicit value always wins.
Everything is written under ``<train.out_dir>-miniature/`` (``base/`` for the random model, ``run/`` for the job).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

from moe_train.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
    validate,
)
from moe_train.io.hf import to_hf
from moe_train.io.hf_common import read_hf_config
from moe_train.io.hf_config import config_from_hf
from moe_train.io.model_file import save_model
from moe_train.model import build_model
from moe_train.parallel.layout import validate_fsdp_config
from moe_train.routing import NullExpertRouter, router_class
from moe_train.train.adak import train_adak
from moe_train.train.metrics import configure_logging
from moe_train.train.trainer import train

log = logging.getLogger(__name__)

# The miniature's sizes. Head dim 8 keeps rotary pairs; two layers keep "first / last layer" differences.
HIDDEN, HEAD_DIM, FFN, LAYERS, VOCAB, SEQ_LEN, MAX_KV_HEADS = 32, 8, 32, 2, 64, 16, 2
TRAIN_STEPS, ADAK_STEPS, VAL_SEQUENCES = 3, 2, 8


def world_size_of(cfg: Config) -> int:
    """The world size the config is written for: parallel.world_size, else one data-parallel replica (ep)."""
    return cfg.parallel.world_size or cfg.parallel.ep


def _real_architecture(cfg: Config) -> ModelConfig:
    """The base model's architecture: the real init_from folder's config.json when readable, else model:."""
    src = cfg.train.init_from
    if src and (Path(src) / "config.json").is_file():
        try:
            return config_from_hf(read_hf_config(src), str(Path(src) / "config.json"))
        except ValueError as e:
            log.warning("miniature: %s is not usable (%s); using the config's model section", src, e)
    return cfg.model


def shrink_model(m: ModelConfig) -> ModelConfig:
    """Tiny widths, same family, expert counts, routing and attention layout (GQA ratio capped at 2)."""
    kv = min(m.num_kv_heads, MAX_KV_HEADS)
    heads = kv * min(m.num_heads // m.num_kv_heads, 2)
    return dataclasses.replace(
        m, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS, num_heads=heads,
        num_kv_heads=kv, head_dim=HEAD_DIM, max_seq_len=4 * SEQ_LEN,
        shared_expert_intermediate_size=FFN if m.shared_expert_intermediate_size else 0,
        moe=copy.deepcopy(m.moe), **_shrink_deepseek(m))


def _shrink_deepseek(m: ModelConfig) -> dict:
    """MLA widths (a low-rank query stays low-rank), one dense-first layer if the model has any (and one MoE layer
    after it), dense FFN width; shared-expert counts, rope scaling and router conventions are kept."""
    return dict(q_lora_rank=None if m.q_lora_rank is None else 2 * HEAD_DIM, kv_lora_rank=2 * HEAD_DIM,
                qk_nope_head_dim=HEAD_DIM, qk_rope_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                first_k_dense_replace=min(m.first_k_dense_replace, 1),
                dense_intermediate_size=FFN if m.dense_intermediate_size else 0)


def _write_base_model(arch: ModelConfig, dst: Path, seed: int) -> None:
    """A random top-k model of ``arch`` at ``dst`` (HF folder, or model.pt when dst ends in .pt), written once:
    every rank of a launch may call this; the content is a function of the seed, and the first rename wins."""
    import torch


    if dst.exists():
        return
    torch.manual_seed(seed)
    model = build_model(arch)
    if dst.suffix == ".pt":
        save_model(model, dst, step=0)  # atomic; every rank writes the same bytes
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}"

    to_hf(model, tmp)
    try:
        os.rename(tmp, dst)
    except OSError:  # another rank of this launch wrote the same model first
        shutil.rmtree(tmp, ignore_errors=True)


def miniature_config(cfg: Config, overrides: Optional[list[str]] = None, write_base: bool = True) -> Config:
    """The miniature of ``cfg`` (validated). Writes the random base model when the config starts from one."""
    t, a = cfg.train, cfg.adak
    root = Path(f"{t.out_dir.rstrip('/')}-miniature")
    mini = copy.deepcopy(cfg)
    mini.model = shrink_model(cfg.model)
    world = world_size_of(cfg)
    mt = mini.train
    mt.out_dir = str(root / "run")
    mt.seq_len = SEQ_LEN
    mt.steps = min(t.steps, TRAIN_STEPS)
    mt.warmup_steps = min(t.warmup_steps, 1)
    mt.log_every = 1
    mt.eval_every = 0
    if t.checkpoint_every:  # keep the cadence's effect: a checkpoint before the end, one at the end
        mt.checkpoint_every = max(1, mt.steps - 1)
    # the global batch stays: it sets the micro-batch per rank, which is part of the layout
    if t.init_from:
        arch = _real_architecture(cfg)
        base_arch = shrink_model(dataclasses.replace(
            arch, moe=dataclasses.replace(arch.moe, router="topk", num_null_experts=0,
                                          top_k=arch.moe.resolved_baseline_top_k, baseline_top_k=None,
                                          target_true_experts=None, k_min=1, k_max=None)))
        # architecture from the base model, routing from the config (as the trainer does on load)
        mini.model = shrink_model(dataclasses.replace(arch, moe=cfg.model.moe))
        is_pt = str(t.init_from).endswith(".pt")
        base = root / "base" / ("model.pt" if is_pt else "hf")
        if write_base:
            _write_base_model(base_arch, base, t.seed)
        mt.init_from = str(base)
    d = mini.data
    d.kind, d.path, d.val_path, d.token_field, d.label_field = "synthetic", None, None, None, None
    d.tokenizer, d.streaming, d.format = "byte", False, "auto"
    d.val_sequences = VAL_SEQUENCES
    ma = mini.adak
    ma.warm_start_steps = min(a.warm_start_steps, ADAK_STEPS)
    ma.ppo_steps = min(a.ppo_steps, ADAK_STEPS)
    ma.val_every = 0
    # enough global batches for the longest stage (each Ada-K stage restarts the data), plus slack
    d.num_sequences = t.batch_size * (max(mt.steps, ma.warm_start_steps, ma.ppo_steps) + 2)
    mini.parallel.world_size = world
    if overrides:
        mini = apply_overrides(mini, overrides)
    try:
        validate(mini)
    except ConfigError as e:
        raise ConfigError(f"the miniature of this config is invalid: {e}") from None
    # the widths FSDP2 shards on dim 1, before any rank is spawned: the real job's (it would fail the same way),
    # then the miniature's own tiny widths
    validate_fsdp_config(cfg, world, _real_architecture(cfg) if t.init_from else cfg.model)
    validate_fsdp_config(mini, world, what="the miniature of this config: ")
    return mini


def run_miniature(config_path: str, overrides: list[str], command: str = "train",
                  check: Optional[Callable[[Config], None]] = None) -> Optional[str]:
    """``moe-train {train,adak} --miniature``: under a launcher (WORLD_SIZE set), run this rank's share; alone,
    spawn the config's world size of gloo processes on this machine and run them. Logs a line per phase; returns
    the summary of what the miniature exercised and proved (rank 0; None on the other ranks of a launch).
    ``check``: the caller's checks of the miniature config, before any rank starts (a ValueError: a user
    mistake)."""
    cfg = load_config(config_path, overrides)
    world = world_size_of(cfg)
    ep = cfg.parallel.ep
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    say = log.info if rank0 else log.debug
    say("miniature [1/4]: %s loaded and valid: world %d (dp %d x ep %d), %s, router %s", config_path, world,
        world // ep, ep, cfg.model.family, cfg.model.moe.router)
    mini = miniature_config(cfg, overrides)  # the base model is written once, before any rank starts
    if check is not None:
        check(mini)
    m = mini.model
    say("miniature [2/4]: tiny sizes (hidden %d, %d layers, vocab %d, seq %d, %d steps)%s", m.hidden_size,
        m.num_layers, m.vocab_size, mini.train.seq_len, mini.train.steps,
        f"; random base model at {mini.train.init_from}" if mini.train.init_from else "")
    if launched > 1 or world == 1:
        say("miniature [3/4]: running %s", f"rank {os.environ.get('RANK', '0')} of {launched}" if launched > 1
            else "in this process")
        _run(command, mini)
    else:
        say("miniature [3/4]: spawning %d gloo ranks (dp %d x ep %d) for %s", world, world // ep, ep, config_path)
        spawn_local(command, mini, world)
    if not rank0:
        return None
    say("miniature [4/4]: ranks finished; checking what they wrote in %s", mini.train.out_dir)
    return miniature_summary(cfg, mini, command, config_path)


def miniature_summary(cfg: Config, mini: Config, command: str, config_path: str = "") -> str:
    """What the miniature run in ``mini.train.out_dir`` exercised (from the config) and proved (from its files)."""
    t, mt, moe = cfg.train, mini.train, cfg.model.moe
    out = Path(mt.out_dir)
    world = mini.parallel.world_size or mini.parallel.ep
    ep = mini.parallel.ep
    rows = []
    null_router = router_class(moe.router) is NullExpertRouter
    null = f" + {moe.num_null_experts} null ({moe.null_kind})" if null_router else ""
    rows.append(("layout", f"world {world} = dp {world // ep} x ep {ep} (gloo, CPU); {moe.num_experts} experts"
                           f"{null}, router {moe.router}, k={moe.top_k}"))
    if t.init_from:
        base = "model.pt" if str(mt.init_from).endswith(".pt") else "Hugging Face folder"
        conv = "top-k -> null experts (AdaMoE conversion)" if null_router else \
            "top-k -> Ada-K allocators" if command == "adak" else f"loaded as {moe.router}"
        rows.append(("conversion on load", f"random base {base}: {conv}"))
    if t.lora_rank:
        rows.append(("LoRA", f"rank {t.lora_rank} on {', '.join(t.lora_targets)}"))
    if t.trainable:
        rows.append(("trainable", ", ".join(t.trainable)))
    rows.append(("precision", t.precision + (" (fp32 on CPU)" if t.precision == "auto" else "")))
    rows.append(("accumulation", f"{mt.grad_accum_steps} micro-batch(es) per step, global batch {mt.batch_size}"))
    if t.activation_checkpointing:
        rows.append(("activation checkpointing", "on"))
    rows.append(("engine", mini.parallel.engine))
    if command == "adak":
        rows.append(("Ada-K", f"warm start {mini.adak.warm_start_steps} + PPO {mini.adak.ppo_steps} steps"))
    proved = []
    steps = _finite_steps(out / "metrics.jsonl")
    if steps:
        proved.append(f"every rank built and sharded the model and trained {steps} step(s) with finite losses")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    if t.checkpoint_every or ckpts:
        rows.append(("checkpoints", f"every {mt.checkpoint_every or 'end'}: " + (", ".join(ckpts) or "none written")))
        if ckpts:
            proved.append(f"{len(ckpts)} resumable checkpoint(s) written")
    if (out / "final" / "model.pt").is_file():
        proved.append("final/model.pt gathered and written")
    if t.export_hf:
        ok = (out / "hf" / "config.json").is_file()
        rows.append(("export", "Hugging Face folder " + ("hf/ written" if ok else "MISSING")))
        if ok:
            proved.append("the HF export written")
    width = max(len(r[0]) for r in rows)
    lines = [f"miniature of {config_path or 'the config'} ({command}): done, outputs in {out}", "exercised:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in rows]
    lines.append("proved: the config validates at its real world size and mesh; " + "; ".join(proved or ["(no outputs found)"]))
    lines.append("not proved: real sizes (memory, speed: `moe-train plan`), real data, convergence")
    return "\n".join(lines)


def _finite_steps(path: Path) -> int:
    """Training (or Ada-K) steps recorded in metrics.jsonl whose loss is finite."""
    import json
    import math

    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        loss = next((r[k] for k in ("loss", "ce_loss", "policy_loss") if k in r), None)
        if isinstance(r, dict) and isinstance(loss, (int, float)) and math.isfinite(loss):
            n += 1
    return n


def _run(command: str, cfg: Config) -> None:
    if command == "adak":
        train_adak(cfg)
    else:
        train(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))  # every address: the rendezvous listens on all of them (a port free on 127.0.0.1 only is not)
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, command: str, cfg_dict: dict) -> None:
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))

    torch.set_num_threads(1)  # many ranks share few cores
    configure_logging()  # a spawned rank starts with Python's defaults, not the parent's logging set-up
    _run(command, from_dict(Config, cfg_dict))


def spawn_local(command: str, cfg: Config, world: int) -> None:
    """Runs ``command`` on ``world`` local gloo ranks (CPU). Raises if any rank fails."""
    import torch.multiprocessing as mp

    if world < 1 or world % cfg.parallel.ep:
        raise ValueError(f"world size {world} must be a positive multiple of parallel.ep={cfg.parallel.ep}")
    mp.start_processes(_rank_main, args=(world, _free_port(), command, to_dict(cfg)), nprocs=world, join=True,
                       start_method="spawn")
