"""Configuration: dataclasses, YAML loading and the one place where a config is validated.

A config file is YAML with up to four sections (``model``, ``train``, ``data``, ``parallel``). Unknown keys,
wrong types and impossible values raise :class:`ConfigError` (a ``ValueError``) naming the key, the value and
what is allowed, before any process group or model is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in a config: the message names the key, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------------------
# The one definition of every list of valid names a config can hold. validate() checks against these; the modules
# that implement them import them from here (this module imports nothing torch-heavy):
#   ROUTERS          moe_train.routing.ROUTER_CLASSES, parallel/megatron/router.py (VariableKRouting.method)
#   FAMILIES         moe_train/io/hf_config.py (the Hugging Face model_type of each family)
#   DROP_POLICIES    moe_train/routing/capacity.py
#   GEMM_BACKENDS    moe_train/kernels/grouped_gemm.py (BACKENDS)
#   PERMUTE_BACKENDS moe_train/kernels/permute.py (BACKENDS)
#   LORA_TARGETS     moe_train/model/lora.py (TARGETS)
#   DATA_FORMATS     moe_train/data/files.py ("auto" or a datasets builder name)
#   SCHEDULES, PRECISIONS, ADAK_DTYPES, ADAK_BASELINES: moe_train/train/
# (Ada-K router modes are not config-facing: moe_train.routing.adak.MODES.)
ROUTERS = ("topk", "null", "adak")
# How the null router ranks experts of EXACTLY equal score (AdaMoE's twin-initialised null gates tie bit for bit
# with their true expert after conversion). The one list of allowed values; routing/topk.py:select_topk applies it.
#   true_first: a stable descending sort, so at equal score a true expert ranks before every null expert (and a
#               lower index before a higher one): deterministic on every device and dtype, and a converted top-k
#               model is function-preserving before training (moe_train/io/convert.py checks when it can be).
#   topk:       torch.topk decides, as the authors' code does: with exact twins the number of true experts a token
#               gets at step 0 depends on the device and dtype (e.g. ~1.25-1.45 instead of 2 for Mixtral, m=16, k=4).
NULL_TIE_BREAKS = ("true_first", "topk")
FAMILIES = ("mixtral", "qwen2_moe")
DROP_POLICIES = ("weight", "position")
SCHEDULES = ("cosine", "constant")
DATA_KINDS = ("synthetic", "files")
DATA_FORMATS = ("auto", "text", "json", "parquet")
GEMM_BACKENDS = ("auto", "grouped_mm", "loop", "te", "te_fp8", "fp8_rowwise", "fp8_tensorwise")
PERMUTE_BACKENDS = ("auto", "torch", "triton")
LORA_TARGETS = ("attention", "experts")
PRECISIONS = ("auto", "fp32", "bf16")
ADAK_DTYPES = ("float32", "bfloat16", "stored")
ADAK_BASELINES = ("batch_mean", "running_mean", "greedy", "none")


@dataclass
class MoEConfig:
    """Routing and experts of every MoE layer.

    router: ``topk`` (baseline), ``null`` (AdaMoE null experts), ``adak`` (Ada-K allocator over a frozen top-k
    router). ``top_k`` is the number of picks over the n true (+ m null) experts; for ``adak`` it is the base
    model's own k, used as the FLOPs baseline, while the allocator picks k in [k_min, k_max].
    """

    router: str = "topk"
    num_experts: int = 8
    top_k: int = 2
    num_null_experts: int = 0
    # Null router: order of exactly tied scores, one of NULL_TIE_BREAKS (see there); "topk" is the authors' behaviour.
    null_tie_break: str = "true_first"
    # Gate convention: renormalise the picked (true) weights to sum to one. Mixtral: True; Qwen1.5-MoE: False.
    norm_topk_prob: bool = True
    # Ada-K action space: k in [k_min, k_max]; k_max defaults to num_experts. k_min=0 allows tokens with no expert.
    k_min: int = 1
    k_max: Optional[int] = None
    # Top-k of the model that FLOPs are reported against (e.g. 2 for Mixtral converted to AdaMoE k=4).
    # Defaults to top_k.
    baseline_top_k: Optional[int] = None
    # Balancing: Switch-style aux loss (null-averaged with null experts), router z-loss, aux-loss-free bias.
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_bias_rate: float = 0.0
    # Compute budget (null router): a PI controller on the null experts' selection bias holds this many true
    # experts per token (per layer); None = off. See moe_train/routing/budget.py.
    target_true_experts: Optional[float] = None
    budget_kp: float = 0.01
    budget_ki: float = 0.002
    # Capacity per expert, ceil(cf * true assignments / E); None = dropless.
    capacity_factor: Optional[float] = None
    drop_policy: str = "weight"
    # Expert GEMM backend: auto | grouped_mm | loop | te | te_fp8 | fp8_rowwise | fp8_tensorwise (docs/kernels.md).
    gemm_backend: str = "auto"
    # Permutation kernels: auto (Triton on CUDA, torch reference on CPU) | torch | triton.
    permute_backend: str = "auto"

    @property
    def resolved_k_max(self) -> int:
        return self.num_experts if self.k_max is None else self.k_max

    @property
    def resolved_baseline_top_k(self) -> int:
        return self.top_k if self.baseline_top_k is None else self.baseline_top_k

    @property
    def max_slots(self) -> int:
        """Kmax: slots per token in a routing plan."""
        return self.resolved_k_max if self.router == "adak" else self.top_k


@dataclass
class ModelConfig:
    family: str = "mixtral"
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128  # per-expert FFN width
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # defaults to hidden_size // num_heads
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 512
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-MoE: q/k/v projections carry a bias
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (with a sigmoid gate); 0 = none
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step (global)
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    out_dir: str = "runs/tiny"
    # Start from a moe_train checkpoint (.pt) or a Hugging Face folder. Its architecture wins; when it is top-k
    # and model.moe.router is null, null experts are added (AdaMoE conversion with model.moe's num_null_experts,
    # top_k, baseline_top_k); model.moe's loss coefficients, budget and capacity settings always apply.
    init_from: Optional[str] = None
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch_size = dp * accum * micro-batch)
    # Train only parameters whose name matches one of these regular expressions (re.search); empty = all.
    # e.g. ["router\\.", "lora_"] for routers + LoRA. Frozen parameters get no gradient and no optimizer state.
    trainable: list[str] = field(default_factory=list)
    lora_rank: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    max_bad_steps: int = 10  # NaN/inf losses: the step is skipped and counted; stop after this many
    eval_every: int = 0  # 0 = only at the end
    peak_tflops: float = 0.0  # per device, for model FLOPs utilisation (0 = not reported)
    tensorboard: bool = True  # event files in out_dir/tb when tensorboard is installed
    # Resumable DCP checkpoints in out_dir/checkpoints (model, optimizer, scheduler, data position, RNG).
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted); 0 = keep all
    resume: bool = True  # continue from out_dir's latest complete checkpoint when there is one
    resume_from: Optional[str] = None  # an explicit checkpoint folder (wins over resume)
    # A resume refuses a config that differs from the checkpoint's in what matters (architecture, routing, LoRA,
    # data, batch...; moe_train/train/fingerprint.py); these keys or sections (e.g. [model.moe.aux_loss_coef],
    # [data], ["*"] for any) are let through. LR, steps, schedule, cadences may always change.
    resume_allow_changes: list[str] = field(default_factory=list)
    export_hf: bool = False  # also write a Hugging Face folder (out_dir/hf) at the end
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    """``kind: synthetic`` generates the difficulty-labelled corpus in memory; ``kind: files`` reads local files."""

    kind: str = "synthetic"
    # synthetic: sequences to generate; files: ignored
    num_sequences: int = 2048
    # held-out sequences: synthetic generates them; files take them from val_path, else from the end of the corpus
    val_sequences: int = 64
    seed: int = 1234
    path: Optional[str] = None  # files: a file, a folder or a glob of .txt / .jsonl / .parquet
    val_path: Optional[str] = None
    format: str = "auto"  # auto (from suffixes) | text | json | parquet
    text_field: str = "text"
    token_field: Optional[str] = None  # pre-tokenised ids instead of text (e.g. `moe-train generate-data` output)
    label_field: Optional[str] = None  # per-token difficulty labels beside token_field (validation reports experts by label)
    tokenizer: str = "byte"  # "byte" or a local folder holding a Hugging Face tokenizer
    streaming: bool = False
    shuffle: bool = True


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree (borrowed from data parallel)
    # The world size this config is written for (e.g. 16 = dp 2 x ep 8). A launch of another size fails at start
    # with a clear error; --miniature runs this many ranks. None = any world size (a multiple of ep).
    world_size: Optional[int] = None
    # Seconds to reach MASTER_ADDR:MASTER_PORT before failing with a clear error, and for any collective.
    rendezvous_timeout_s: float = 60.0
    collective_timeout_s: float = 600.0
    # Balancing loss from the per-expert counts summed over all ranks (Megatron's global aux loss).
    global_aux_loss: bool = False


@dataclass
class AdaKConfig:
    """Ada-K training (``moe-train adak``): allocator warm start, then PPO, on a frozen base model.

    The base model comes from ``train.init_from`` (a moe_train checkpoint or a Hugging Face folder); a top-k model is
    converted (routers become AdaKRouter with the same gate, k in [k_min, k_max], FLOPs baseline = its top_k).
    ``train.batch_size``, ``train.seq_len``, ``train.seed``, ``train.beta1/beta2``, ``train.grad_clip``,
    ``train.log_every`` and ``train.out_dir`` apply; ``train.steps`` / ``train.lr`` do not (see below).
    Defaults are the paper's (Ada-K, arXiv 2410.10456, Table 11; docs/references.md section 2); items marked
    unverified there are configurable here.
    """

    k_min: int = 1  # whether the paper allows k=0 is unverified
    k_max: Optional[int] = None  # None = num_experts
    # dtype of the frozen base: float32 (CPU: bf16 matmul is ~100x slower there) | bfloat16 (the paper's precision,
    # GPU) | stored (a Hugging Face folder's own dtype). The allocators are always fp32 master weights computed in fp32.
    dtype: str = "float32"
    lr: float = 1e-3  # AdamW, constant (paper Table 11), both stages
    weight_decay: float = 0.1
    # Warm start: cross-entropy on k* = smallest k whose cumulative sorted router probability reaches the threshold.
    warm_start_steps: int = 50
    warm_start_threshold: float = 0.3
    # PPO: reward_t = log P(x_t | x_<t) - penalty * (true experts summed over layers for token t).
    ppo_steps: int = 200
    penalty: float = 3e-3  # lambda
    ppo_epochs: int = 2
    ppo_minibatches: int = 1  # gradient steps per PPO epoch (the batch split into this many parts)
    clip_eps: float = 0.2
    # batch_mean | running_mean | greedy | none (moe_train/train/adak.py). greedy (self-critical, one extra forward)
    # is the default: on the tiny demo batch_mean's variance raised mean k where greedy lowered it (docs/adak.md).
    baseline: str = "greedy"
    running_mean_decay: float = 0.9
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    val_every: int = 0  # validation loss / mean k every n PPO steps (0 = only at the end)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    adak: AdaKConfig = field(default_factory=AdaKConfig)


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (int, float, str, bool, Optional, dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:  # the router named "null" is the usual victim
            raise ConfigError(f"{path}: expected a string, got nothing: YAML reads an unquoted null as no value; "
                              f"quote it (router: \"null\", or --set '{path}=\"null\"')")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} at {path}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"{where}: unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Loads a YAML config, applies ``key.sub=value`` overrides, validates, returns a :class:`Config`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {str(path)!r} is a directory, not a YAML file: give the file itself, e.g. "
                          f"--config {str(path / 'config.yaml')!r}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (undecodable byte at offset {e.start}): "
                          f"save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    data = _parse_yaml(text, f"config file {str(path)!r}")
    if data is None:
        raise ConfigError(f"config file {str(path)!r} is empty: write the sections you change (model / train / data "
                          f"/ parallel), or `{{}}` to train on every default on purpose")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections model/train/data/parallel")
    _set_keys(data, overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _set_keys(data: dict, overrides: list[str]) -> None:
    """Applies ``key.sub=value`` overrides (values parsed as YAML) to a config mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.steps=10")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is inside a value, not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}: the value")


def _parse_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, a syntax error becoming a ConfigError with its line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new validated Config: ``cfg`` with ``key.sub=value`` overrides applied (as load_config does)."""
    data = to_dict(cfg)
    _set_keys(data, overrides)
    out = from_dict(Config, data)
    validate(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# validation: the one place


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float of a config section (nested sections too) is finite: YAML's .inf / .nan are never meaningful."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(where, value, "must be a finite number (YAML .inf / .nan are not allowed here)")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    p = prefix
    _check_finite(m, p)
    if m.family not in FAMILIES:
        _fail(f"{p}.family", m.family, f"one of {FAMILIES}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "max_seq_len"):
        if getattr(m, key) < 1:
            _fail(f"{p}.{key}", getattr(m, key), "must be >= 1")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        _fail(f"{p}.hidden_size", m.hidden_size,
              f"must be divisible by num_heads={m.num_heads} (or set model.head_dim explicitly)")
    if m.head_dim is not None and (m.head_dim < 2 or m.head_dim % 2):
        _fail(f"{p}.head_dim", m.head_dim, "must be an even number >= 2 (rotary embeddings rotate pairs)")
    if m.resolved_head_dim % 2:
        _fail(f"{p}.hidden_size", m.hidden_size, "hidden_size / num_heads must be even for rotary embeddings")
    if m.num_heads % m.num_kv_heads:
        _fail(f"{p}.num_kv_heads", m.num_kv_heads, f"must divide num_heads={m.num_heads} (grouped-query attention)")
    if m.shared_expert_intermediate_size < 0:
        _fail(f"{p}.shared_expert_intermediate_size", m.shared_expert_intermediate_size, "must be >= 0")
    if m.rms_norm_eps <= 0:
        _fail(f"{p}.rms_norm_eps", m.rms_norm_eps, "must be > 0")
    if m.init_std <= 0:
        _fail(f"{p}.init_std", m.init_std, "must be > 0")
    validate_moe(m.moe, f"{p}.moe")


def validate_moe(e: MoEConfig, p: str = "model.moe") -> None:
    if e.router not in ROUTERS:
        _fail(f"{p}.router", e.router, f"one of {ROUTERS}")
    if e.num_experts < 1:
        _fail(f"{p}.num_experts", e.num_experts, "must be >= 1")
    if e.num_null_experts < 0:
        _fail(f"{p}.num_null_experts", e.num_null_experts, "must be >= 0")
    if e.num_null_experts > 0 and e.router != "null":
        _fail(f"{p}.num_null_experts", e.num_null_experts,
              f"null experts need router: null (router is {e.router!r}); set num_null_experts: 0 or router: null")
    if e.null_tie_break not in NULL_TIE_BREAKS:
        _fail(f"{p}.null_tie_break", e.null_tie_break, f"one of {NULL_TIE_BREAKS} (see NULL_TIE_BREAKS in config.py)")
    pickable = e.num_experts + (e.num_null_experts if e.router == "null" else 0)
    if not 1 <= e.top_k <= pickable:
        what = "true + null experts" if e.router == "null" else "experts"
        _fail(f"{p}.top_k", e.top_k, f"must be in [1, {pickable}] (k cannot exceed the {pickable} {what})")
    if e.router == "adak":
        if e.k_min < 0:
            _fail(f"{p}.k_min", e.k_min, "must be >= 0")
        if not 1 <= e.resolved_k_max <= e.num_experts:
            _fail(f"{p}.k_max", e.k_max, f"must be in [1, num_experts={e.num_experts}]")
        if e.k_min > e.resolved_k_max:
            _fail(f"{p}.k_min", e.k_min, f"must be <= k_max={e.resolved_k_max}")
    if e.target_true_experts is not None:
        if e.router != "null":
            _fail(f"{p}.target_true_experts", e.target_true_experts,
                  f"a compute budget steers null experts: needs router: null (router is {e.router!r})")
        # k picks over n true + m null experts: a token uses between max(0, k - m) and min(k, n) true experts;
        # a target outside that range can never be met and the controller would only saturate.
        lo, hi = max(0, e.top_k - e.num_null_experts), min(e.top_k, e.num_experts)
        if not (math.isfinite(e.target_true_experts) and lo <= e.target_true_experts <= hi):
            _fail(f"{p}.target_true_experts", e.target_true_experts,
                  f"must be in [{lo}, {hi}] = [max(0, top_k - num_null_experts), min(top_k, num_experts)] (top_k="
                  f"{e.top_k} picks over {e.num_experts} true + {e.num_null_experts} null experts)")
    for key in ("budget_kp", "budget_ki"):
        if getattr(e, key) < 0:
            _fail(f"{p}.{key}", getattr(e, key), "must be >= 0")
    if e.baseline_top_k is not None and not 1 <= e.baseline_top_k <= e.num_experts:
        _fail(f"{p}.baseline_top_k", e.baseline_top_k, f"must be in [1, num_experts={e.num_experts}]")
    for key in ("aux_loss_coef", "z_loss_coef", "expert_bias_rate"):
        if getattr(e, key) < 0 or not math.isfinite(getattr(e, key)):
            _fail(f"{p}.{key}", getattr(e, key), "must be a finite number >= 0")
    if e.capacity_factor is not None and not e.capacity_factor > 0:
        _fail(f"{p}.capacity_factor", e.capacity_factor, "must be > 0, or null for dropless routing")
    if e.drop_policy not in DROP_POLICIES:
        _fail(f"{p}.drop_policy", e.drop_policy, f"one of {DROP_POLICIES}")
    if e.gemm_backend not in GEMM_BACKENDS:
        _fail(f"{p}.gemm_backend", e.gemm_backend, f"one of {GEMM_BACKENDS} (see moe_train.kernels.grouped_gemm)")
    if e.permute_backend not in PERMUTE_BACKENDS:
        _fail(f"{p}.permute_backend", e.permute_backend, f"one of {PERMUTE_BACKENDS}")


def _is_config_key(key: str) -> bool:
    """Whether ``key`` (dotted) names a field or a section of Config (``launch`` holds the world and ep sizes
    stored with a checkpoint)."""
    parts = key.split(".")
    if parts[0] == "launch":
        return len(parts) == 1 or (len(parts) == 2 and parts[1] in ("world_size", "ep_size"))
    tp: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


def validate(cfg: Config) -> None:
    _check_finite(cfg, "")
    validate_model(cfg.model)
    t = cfg.train
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            _fail(f"train.{key}", getattr(t, key), "must be in [0, 1)")
    for key in ("steps", "batch_size", "seq_len", "log_every"):
        if getattr(t, key) < 1:
            _fail(f"train.{key}", getattr(t, key), "must be >= 1")
    if t.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", t.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if not t.lr > 0:
        _fail("train.lr", t.lr, "must be > 0")
    if t.weight_decay < 0:
        _fail("train.weight_decay", t.weight_decay, "must be >= 0")
    if t.warmup_steps < 0:
        _fail("train.warmup_steps", t.warmup_steps, "must be >= 0")
    if t.schedule not in SCHEDULES:
        _fail("train.schedule", t.schedule, f"one of {SCHEDULES}")
    if not 0 <= t.min_lr_ratio <= 1:
        _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    if t.grad_clip < 0:
        _fail("train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", t.grad_accum_steps, f"must be >= 1 and divide train.batch_size={t.batch_size}")
    for i, pattern in enumerate(t.trainable):
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(f"train.trainable[{i}]", pattern, f"a valid regular expression ({err})")
    if t.lora_rank < 0:
        _fail("train.lora_rank", t.lora_rank, "must be >= 0 (0 = no LoRA)")
    bad = sorted(set(t.lora_targets) - set(LORA_TARGETS))
    if bad:
        _fail("train.lora_targets", t.lora_targets, f"a list drawn from {list(LORA_TARGETS)}")
    if t.max_bad_steps < 0:
        _fail("train.max_bad_steps", t.max_bad_steps, "must be >= 0")
    for i, key in enumerate(t.resume_allow_changes):
        if key != "*" and not _is_config_key(key):
            _fail(f"train.resume_allow_changes[{i}]", key, "a config key or section such as model.hidden_size, "
                  "model.moe, data, or \"*\" for any")
    if t.precision not in PRECISIONS:
        _fail("train.precision", t.precision, f"one of {PRECISIONS}")
    if t.checkpoint_every < 0 or t.keep_last < 0:
        _fail("train.checkpoint_every" if t.checkpoint_every < 0 else "train.keep_last",
              t.checkpoint_every if t.checkpoint_every < 0 else t.keep_last, "must be >= 0")
    if t.eval_every < 0 or t.peak_tflops < 0:
        _fail("train.eval_every" if t.eval_every < 0 else "train.peak_tflops",
              t.eval_every if t.eval_every < 0 else t.peak_tflops, "must be >= 0")
    d = cfg.data
    if d.kind not in DATA_KINDS:
        _fail("data.kind", d.kind, f"one of {DATA_KINDS}")
    if d.kind == "files" and not d.path:
        _fail("data.path", d.path, "data.kind: files needs data.path (a file, a folder or a glob)")
    if d.format not in DATA_FORMATS:
        _fail("data.format", d.format, f"one of {DATA_FORMATS}")
    if d.label_field and not d.token_field:
        _fail("data.label_field", d.label_field, "labels align with pre-tokenised ids: set data.token_field too")
    if d.streaming and d.kind != "files":
        _fail("data.streaming", d.streaming, "streaming reads files: set data.kind: files")
    if cfg.data.num_sequences < 1:
        _fail("data.num_sequences", cfg.data.num_sequences, "must be >= 1")
    if cfg.data.val_sequences < 0:
        _fail("data.val_sequences", cfg.data.val_sequences, "must be >= 0")
    for key in ("rendezvous_timeout_s", "collective_timeout_s"):
        if not getattr(cfg.parallel, key) > 0:
            _fail(f"parallel.{key}", getattr(cfg.parallel, key), "must be > 0 seconds")
    e = cfg.parallel.ep
    if e < 1:
        _fail("parallel.ep", e, "must be >= 1")
    w = cfg.parallel.world_size
    if w is not None and (w < 1 or w % e):
        _fail("parallel.world_size", w, f"must be a positive multiple of parallel.ep={e} (or null: any size)")
    if e > cfg.model.moe.num_experts or cfg.model.moe.num_experts % e:
        _fail("parallel.ep", e, f"must divide model.moe.num_experts={cfg.model.moe.num_experts}")
    validate_adak(cfg.adak, cfg.model.moe)


def validate_adak(a: AdaKConfig, moe: MoEConfig, p: str = "adak") -> None:
    if a.k_min < 0:
        _fail(f"{p}.k_min", a.k_min, "must be >= 0 (0 lets a token skip the layer's experts)")
    if a.k_max is not None and not 1 <= a.k_max <= moe.num_experts:
        _fail(f"{p}.k_max", a.k_max, f"must be in [1, model.moe.num_experts={moe.num_experts}] or null")
    k_max = moe.num_experts if a.k_max is None else a.k_max
    if a.k_min > k_max:
        _fail(f"{p}.k_min", a.k_min, f"must be <= k_max={k_max}")
    for key in ("lr", "clip_eps"):
        if not (getattr(a, key) > 0 and math.isfinite(getattr(a, key))):
            _fail(f"{p}.{key}", getattr(a, key), "must be a finite number > 0")
    for key in ("weight_decay", "penalty", "entropy_coef"):
        if not (getattr(a, key) >= 0 and math.isfinite(getattr(a, key))):
            _fail(f"{p}.{key}", getattr(a, key), "must be a finite number >= 0")
    for key in ("warm_start_steps", "ppo_steps", "val_every"):
        if getattr(a, key) < 0:
            _fail(f"{p}.{key}", getattr(a, key), "must be >= 0")
    for key in ("ppo_epochs", "ppo_minibatches"):
        if getattr(a, key) < 1:
            _fail(f"{p}.{key}", getattr(a, key), "must be >= 1")
    if not 0 < a.warm_start_threshold <= 1:
        _fail(f"{p}.warm_start_threshold", a.warm_start_threshold, "must be in (0, 1]")
    if a.dtype not in ADAK_DTYPES:
        _fail(f"{p}.dtype", a.dtype, f"one of {ADAK_DTYPES}")
    if a.baseline not in ADAK_BASELINES:
        _fail(f"{p}.baseline", a.baseline, f"one of {ADAK_BASELINES}")
    if not 0 <= a.running_mean_decay < 1:
        _fail(f"{p}.running_mean_decay", a.running_mean_decay, "must be in [0, 1)")
