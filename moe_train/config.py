"""Configuration: dataclasses, YAML loading and validation.

A config file is YAML with up to four sections (``model``, ``train``, ``data``, ``parallel``). Unknown keys,
wrong types and impossible values raise :class:`ConfigError` (a ``ValueError``) naming the key, the value and
what is allowed, before any process group or model is built.

Layering: config sits above moe_train.routing and moe_train.kernels (pyproject.toml's import-linter contract): the
lists of valid names of routing and kernel settings are defined by the modules that implement them and imported
here, and validate_moe asks the router's own class for its checks (routing/registry.py router_class).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from moe_train.errors import ConfigError, config_fail
from moe_train.kernels.grouped_gemm import GEMM_BACKENDS
from moe_train.kernels.permute import PERMUTE_BACKENDS
from moe_train.kernels.routing import ROUTING_BACKENDS
from moe_train.routing.base import ALIASES
from moe_train.routing.capacity import DROP_POLICIES
from moe_train.routing.null_experts import NULL_TIE_BREAKS
from moe_train.routing.registry import canonical_router_name, router_class, router_names
from moe_train.routing.scores import SCORE_FUNCS, TOPK_METHODS
from moe_train.routing.zero_compute import NULL_KINDS

# ----------------------------------------------------------------------------------------------------------
# Every list of valid names a config can hold. Those of routing and kernel settings are defined beside their
# implementation and imported above:
#   ROUTERS          moe_train/routing/registry.py router_names() (each router class registers itself; old names
#                    such as "null" -> "null_experts" are aliases, routing/base.py ALIASES)
#   NULL_TIE_BREAKS  moe_train/routing/null_experts.py     NULL_KINDS       moe_train/routing/zero_compute.py
#   SCORE_FUNCS      moe_train/kernels/routing.py (re-exported by routing/scores.py)
#   TOPK_METHODS     moe_train/routing/scores.py           DROP_POLICIES    moe_train/routing/capacity.py
#   GEMM_BACKENDS    moe_train/kernels/grouped_gemm.py     PERMUTE_BACKENDS moe_train/kernels/permute.py
#   ROUTING_BACKENDS moe_train/kernels/routing.py
# The rest are defined here; the modules that implement them (above config) import them from here:
#   FAMILIES         moe_train/io/hf_config.py (the Hugging Face model_type of each family)
#   LORA_TARGETS     moe_train/model/lora.py (TARGETS)
#   DATA_FORMATS     moe_train/data/files.py ("auto" or a datasets builder name)
#   CORPORA          moe_train/data/corpora.py (the generated corpora of data.corpus)
#   SCHEDULES, PRECISIONS, ADAK_DTYPES, ADAK_BASELINES: moe_train/train/
# (Ada-K router modes are not config-facing: moe_train.routing.adak.MODES.)
ROUTERS = router_names()
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "longcat_flash")
# Families whose attention is DeepSeek's multi-head latent attention (moe_train/model/mla.py) instead of GQA.
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "longcat_flash")
# RoPE variants (model/decoder.py RotaryEmbedding): default | yarn (DeepSeek-V2-Lite / V3, as transformers computes it)
ROPE_TYPES = ("default", "yarn")
SCHEDULES = ("cosine", "constant")
DATA_KINDS = ("synthetic", "files")
# Generated corpora (data.corpus), each with its per-token difficulty labels; moe_train/data/corpora.py implements
# them: mixed (filler / copy / arith / bracket, moe_train/data/generated.py) | difficulty (recall at several table
# sizes, arithmetic, brackets, trivial, unpredictable, copy: moe_train/data/difficulty.py).
CORPORA = ("mixed", "difficulty")
DATA_FORMATS = ("auto", "text", "json", "parquet")
LORA_TARGETS = ("attention", "experts")
PRECISIONS = ("auto", "fp32", "bf16")
ADAK_DTYPES = ("float32", "bfloat16", "stored")
ADAK_BASELINES = ("batch_mean", "running_mean", "greedy", "none")
# Training engines (parallel.engine): fsdp = moe_train's own loop under FSDP2 (parallel/parallelize.py); deepspeed =
# the same loop with DeepSpeed's engine doing backward / reduction / clipping / optimizer step / checkpoints
# (train/deepspeed_engine.py, docs/deepspeed.md). Each engine's class is in train/engine_registry.py; the facts that
# layers below train/ need (parallel/layout.py) live here, one row per engine, and the classes read the same row.
@dataclass(frozen=True)
class EngineFacts:
    fsdp2: bool  # shards the model with FSDP2 (parallel/parallelize.py): its dim-1 widths must divide evenly


ENGINE_FACTS = {"fsdp": EngineFacts(fsdp2=True), "deepspeed": EngineFacts(fsdp2=False)}
ENGINES = tuple(ENGINE_FACTS)
# ZeRO stages DeepSpeed runs here:
DEEPSPEED_STAGES = (1, 2, 3)
# The choice keys' types: each list above as a Literal, checked where YAML is read (from_dict: an unknown value is a
# ConfigError naming the key and the allowed values). model.moe.router also takes the routers' old names (ALIASES),
# which MoEConfig turns into the router they name.
RouterName = Literal[(*ROUTERS, *ALIASES)]
Family = Literal[FAMILIES]
RopeType = Literal[ROPE_TYPES]
NullTieBreak = Literal[NULL_TIE_BREAKS]
NullKind = Literal[NULL_KINDS]
ScoreFunc = Literal[SCORE_FUNCS]
TopkMethod = Literal[TOPK_METHODS]
DropPolicy = Literal[DROP_POLICIES]
GemmBackend = Literal[GEMM_BACKENDS]
PermuteBackend = Literal[PERMUTE_BACKENDS]
RoutingBackend = Literal[ROUTING_BACKENDS]
Schedule = Literal[SCHEDULES]
Precision = Literal[PRECISIONS]
LoraTarget = Literal[LORA_TARGETS]
DataKind = Literal[DATA_KINDS]
Corpus = Literal[CORPORA]
DataFormat = Literal[DATA_FORMATS]
Engine = Literal[ENGINES]
DeepSpeedStage = Literal[DEEPSPEED_STAGES]
AdakDtype = Literal[ADAK_DTYPES]
AdakBaseline = Literal[ADAK_BASELINES]
# Keys of a DeepSpeed JSON (deepspeed.config) that moe_train sets from its own config: refused in the JSON, with the
# moe_train key to use instead (one source of truth for the batch, precision, optimizer and schedule).
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size / world / accum",
    "gradient_accumulation_steps": "train.grad_accum_steps", "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision", "bfloat16": "train.precision", "fp16": "train.precision (fp16 is not supported)",
    "optimizer": "train.lr/beta1/beta2/weight_decay (moe_train's AdamW)",
    "scheduler": "train.schedule/warmup_steps (moe_train's LR schedule)",
}
# What DeepSpeed 0.19.8 reads from its JSON (deepspeed/runtime/config.py DeepSpeedConfig._initialize_params and the
# section configs it calls; zero_optimization: runtime/zero/config.py DeepSpeedZeroConfig, fields and stage3_
# aliases). A key outside these is ignored by DeepSpeed without a word (a typo "zero_optimisation" ran stage 1), so it
# is refused here with the closest valid key. Types: "int", "float", "bool", "str", "map" (a JSON object; its own
# keys are DeepSpeed's to check), "?" allows null. The keys moe_train owns are in DEEPSPEED_OWNED_KEYS.
DEEPSPEED_KEYS: dict[str, str] = {
    **dict.fromkeys(("dump_state", "disable_python_gc", "disable_allgather", "prescale_gradients",
                     "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
                     "zero_force_ds_cpu_optimizer", "dataloader_drop_last", "managed_gradient_accumulation",
                     "use_data_before_expert_parallelism"), "bool"),
    **dict.fromkeys(("sequence_parallel_size", "vocabulary_size"), "int"),
    "steps_per_print": "int?", "gradient_predivide_factor": "float", "communication_data_type": "str?",
    "seq_parallel_communication_data_type": "str", "gradient_allreduce_op": "str", "log_level": "str?",
    **dict.fromkeys(("activation_checkpointing", "aio", "autotuning", "checkpoint", "comet", "comms_logger", "compile",
                     "csv_monitor", "data_efficiency", "data_types", "datastates_ckpt", "flops_profiler",
                     "hybrid_engine", "pipeline", "tensor_parallel", "tensorboard", "timers", "torch_autocast", "wandb",
                     "weight_quantization", "zero_optimization"), "map"),
}
DEEPSPEED_ZERO_KEYS: dict[str, str] = {
    "stage": "int",
    **dict.fromkeys(("contiguous_gradients", "reduce_scatter", "use_multi_rank_bucket_allreduce",
                     "allgather_partitions", "compute_grad_norm", "load_from_fp32_weights", "elastic_checkpoint",
                     "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
                     "stage3_gather_fp16_weights_on_model_save", "use_all_reduce_for_fetch_params",
                     "stage3_use_all_reduce_for_fetch_params", "allgather_sequential", "stage3_allgather_sequential",
                     "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients", "parameter_alignment",
                     "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
                     "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
                     "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory"),
                   "bool"),
    "overlap_comm": "bool?",
    **dict.fromkeys(("reduce_bucket_size", "allgather_bucket_size", "sub_group_size", "zero_hpz_partition_size",
                     *(f"{prefix}{k}" for prefix in ("", "stage3_") for k in (
                         "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
                         "max_live_parameters", "max_reuse_distance", "module_granularity_threshold"))), "int"),
    **dict.fromkeys(("zenflow", "leaf_module"), "map?"),
}
# Offloading moves optimizer state / parameters to CPU or NVMe; it is not wired into moe_train's engine (its
# optimizer is moe_train's AdamW, not DeepSpeed's CPU Adam), so these are refused before any work.
DEEPSPEED_OFFLOAD_KEYS = ("offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param",
                          "cpu_offload_use_pin_memory")
# Sections that do expert parallelism DeepSpeed's way: moe_train does its own (parallel.ep).
DEEPSPEED_EP_KEYS = ("moe", "expert_parallel")
# The choice tuple of each config key that takes one of a fixed set of values (`moe-train config --explain`,
# moe_train/explain.py, shows them; validate() checks the same tuples). Metadata only.
CHOICES: dict[str, tuple] = {
    "model.family": FAMILIES, "model.rope_scaling.type": ROPE_TYPES, "model.moe.router": ROUTERS,
    "model.moe.null_tie_break": NULL_TIE_BREAKS, "model.moe.null_kind": NULL_KINDS,
    "model.moe.score_func": SCORE_FUNCS, "model.moe.topk_method": TOPK_METHODS,
    "model.moe.drop_policy": DROP_POLICIES, "model.moe.gemm_backend": GEMM_BACKENDS,
    "model.moe.permute_backend": PERMUTE_BACKENDS, "model.moe.routing_backend": ROUTING_BACKENDS,
    "train.schedule": SCHEDULES, "train.precision": PRECISIONS, "train.lora_targets": LORA_TARGETS,
    "data.kind": DATA_KINDS, "data.corpus": CORPORA, "data.format": DATA_FORMATS,
    "parallel.engine": ENGINES, "deepspeed.stage": DEEPSPEED_STAGES,
    "adak.dtype": ADAK_DTYPES, "adak.baseline": ADAK_BASELINES,
}


@dataclass
class MoEConfig:
    """Routing and experts of every MoE layer.

    router: ``topk`` (baseline), ``null_experts`` (AdaMoE null experts; old name ``null``), ``adak`` (Ada-K allocator over a frozen top-k
    router), ``top_p`` (the smallest expert set reaching probability top_p, Huang et al. 2024). ``top_k`` is the
    number of picks over the n true (+ m null) experts; for ``adak`` it is the base model's own k, used as the FLOPs
    baseline, while the allocator picks k in [k_min, k_max]; for ``top_p`` only the FLOPs baseline.
    """

    router: RouterName = "topk"
    num_experts: int = 8
    top_k: int = 2
    num_null_experts: int = 0
    # Null router: order of exactly tied scores, one of NULL_TIE_BREAKS (see there); "topk" is the authors' behaviour.
    null_tie_break: NullTieBreak = "true_first"
    # What a picked null expert contributes, one of NULL_KINDS (see there): zero (AdaMoE), identity, constant.
    null_kind: NullKind = "zero"
    # Gate convention: renormalise the picked (true) weights to sum to one. Mixtral: True; Qwen1.5-MoE: False.
    norm_topk_prob: bool = True
    # DeepSeek router conventions (SCORE_FUNCS / TOPK_METHODS above; routing/scores.py): scores from the logits,
    # group-limited selection over n_group groups of num_experts / n_group experts keeping topk_group of them, and a
    # factor on the routed (true) gate weights, applied after any renormalisation.
    score_func: ScoreFunc = "softmax"
    topk_method: TopkMethod = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # The router carries a selection-only expert bias even when expert_bias_rate is 0 (DeepSeek-V3's
    # e_score_correction_bias, imported into the `expert_bias` buffer; expert_bias_rate > 0 also trains it).
    use_expert_bias: bool = False
    # Ada-K action space: k in [k_min, k_max]; k_max defaults to num_experts. k_min=0 allows tokens with no expert.
    k_min: int = 1
    k_max: Optional[int] = None
    # Top-p router (Huang et al. 2024, routing/top_p.py): each token takes the smallest set of experts whose summed
    # probability reaches top_p (capped at k_max experts, default num_experts), plus the entropy ("dynamic") loss of
    # the router distribution, weighted by entropy_loss_coef; top_k is then only the FLOPs baseline.
    top_p: float = 0.4
    entropy_loss_coef: float = 1e-4
    # Top-p gates: False (default) = the kept experts' raw probabilities, as the paper and its released code do; True
    # = renormalised over the kept experts (sum to one; set it to continue a norm_topk_prob top-k model as top-p with
    # the same gates). norm_topk_prob is not read by top_p; routed_scaling_factor applies after either.
    top_p_renormalize: bool = False
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
    drop_policy: DropPolicy = "weight"
    # Expert GEMM backend: auto | grouped_mm | loop | te | te_fp8 | fp8_rowwise | fp8_tensorwise (docs/kernels.md).
    gemm_backend: GemmBackend = "auto"
    # Permutation kernels: auto (Triton on CUDA, torch reference on CPU) | torch | triton.
    permute_backend: PermuteBackend = "auto"
    # Routing in one pass (ROUTING_BACKENDS above; kernels/routing.py): auto | torch | triton.
    routing_backend: RoutingBackend = "auto"

    def __post_init__(self):
        # an old router name (router: "null" before null_experts) loads as the router it names, so an old config,
        # model file or checkpoint record is this router's (routing/registry.py logs the rename once)
        if isinstance(self.router, str) and self.router not in router_names():
            try:
                self.router = canonical_router_name(self.router)
            except ConfigError:
                pass  # validate_moe names the key and the allowed routers

    @property
    def pickable_experts(self) -> int:
        """n true + m null experts (the null router, and Ada-K over a null router's ranking), else n."""
        return router_class(self.router).pickable_experts(self)

    @property
    def resolved_k_max(self) -> int:
        return router_class(self.router).resolved_k_max(self)

    @property
    def resolved_baseline_top_k(self) -> int:
        return self.top_k if self.baseline_top_k is None else self.baseline_top_k

    @property
    def max_slots(self) -> int:
        """Kmax: slots per token in a routing plan."""
        return router_class(self.router).max_slots(self)

    def validate(self, prefix: str = "model.moe") -> None:
        """This section's checks (validate_moe), each router's own from its class (routing/base.py)."""
        validate_moe(self, prefix)


@dataclass
class RopeScalingConfig:
    """RoPE scaling (ROPE_TYPES). yarn follows transformers' _compute_yarn_parameters: inverse frequencies blended
    between factor-interpolated and original over [beta_fast, beta_slow] rotations of the original context, cos/sin
    scaled by attention_factor (default: mscale(factor, mscale) / mscale(factor, mscale_all_dim), or
    mscale(factor) without both), and under MLA the softmax scale times mscale(factor, mscale_all_dim)^2."""

    type: RopeType = "default"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True


@dataclass
class ModelConfig:
    family: Family = "mixtral"
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
    # DeepSeek MLA (MLA_FAMILIES; model/mla.py, HF names): q_lora_rank None = a full q_proj; key/value go through a
    # kv_lora_rank latent; each head's query/key is qk_nope_head_dim (no position) + qk_rope_head_dim (RoPE, shared
    # by all heads for the key); values are v_head_dim wide. Unused by the other families.
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek) instead of the two halves (rotate-half); None =
    # the family's own (True for MLA_FAMILIES, False otherwise).
    rope_interleave: Optional[bool] = None
    # The first first_k_dense_replace layers are dense SwiGLU MLPs of width dense_intermediate_size (DeepSeek);
    # the rest are MoE layers.
    first_k_dense_replace: int = 0
    dense_intermediate_size: int = 0
    # DeepSeek shared experts: an ungated SwiGLU of width intermediate_size * n_shared_experts beside the routed ones.
    n_shared_experts: int = 0
    attention_bias: bool = False  # Qwen2-MoE: q/k/v projections carry a bias (Qwen3-MoE: q/k/v and o)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (with a sigmoid gate); 0 = none
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope_scaling: RopeScalingConfig = field(default_factory=lambda: RopeScalingConfig())

    @property
    def resolved_head_dim(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def uses_mla(self) -> bool:
        return self.family in MLA_FAMILIES

    @property
    def rope_dim(self) -> int:
        """The head dims RoPE rotates: qk_rope_head_dim under MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.uses_mla else self.resolved_head_dim

    @property
    def resolved_rope_interleave(self) -> bool:
        return self.uses_mla if self.rope_interleave is None else self.rope_interleave

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        """Layers with a router (every layer but DeepSeek's dense-first ones): one routing plan each."""
        return self.num_layers - self.first_k_dense_replace

    def validate(self, prefix: str = "model") -> None:
        """This section's checks (validate_model), model.moe's among them."""
        validate_model(self, prefix)


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
    schedule: Schedule = "cosine"
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
    lora_targets: list[LoraTarget] = field(default_factory=lambda: ["attention", "experts"])
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
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | fp32 | bf16
    activation_checkpointing: bool = False
    # torch.compile each decoder block in place (parallel/compile.py; docs/compile.md); not with DeepSpeed ZeRO 3
    compile: bool = False

    def validate(self) -> None:
        """The train section's own checks (validate(cfg): those across sections)."""
        t = self
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(t, key) < 1:
                _fail(f"train.{key}", getattr(t, key), "must be in [0, 1)")
        for key in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(t, key) < 1:
                _fail(f"train.{key}", getattr(t, key), "must be >= 1")
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


@dataclass
class DataConfig:
    """``kind: synthetic`` generates the difficulty-labelled corpus in memory; ``kind: files`` reads local files."""

    kind: DataKind = "synthetic"
    # which generated corpus (CORPORA): synthetic generates it; files with label_field name their labels by it
    corpus: Corpus = "mixed"
    # synthetic: sequences to generate; files: ignored
    num_sequences: int = 2048
    # held-out sequences: synthetic generates them; files take them from val_path, else from the end of the corpus
    val_sequences: int = 64
    seed: int = 1234
    path: Optional[str] = None  # files: a file, a folder or a glob of .txt / .jsonl / .parquet
    val_path: Optional[str] = None
    format: DataFormat = "auto"  # auto (from suffixes) | text | json | parquet
    text_field: str = "text"
    token_field: Optional[str] = None  # pre-tokenised ids instead of text (e.g. `moe-train generate-data` output)
    label_field: Optional[str] = None  # per-token difficulty labels beside token_field (validation reports experts by label)
    tokenizer: str = "byte"  # "byte" or a local folder holding a Hugging Face tokenizer
    streaming: bool = False
    shuffle: bool = True

    def validate(self) -> None:
        """The data section's own checks."""
        d = self
        if d.kind not in DATA_KINDS:
            _fail("data.kind", d.kind, f"one of {DATA_KINDS}")
        if d.corpus not in CORPORA:
            _fail("data.corpus", d.corpus, f"one of {CORPORA} (moe_train/data/corpora.py)")
        if d.kind == "files" and not d.path:
            _fail("data.path", d.path, "data.kind: files needs data.path (a file, a folder or a glob)")
        if d.format not in DATA_FORMATS:
            _fail("data.format", d.format, f"one of {DATA_FORMATS}")
        if d.label_field and not d.token_field:
            _fail("data.label_field", d.label_field, "labels align with pre-tokenised ids: set data.token_field too")
        if d.streaming and d.kind != "files":
            _fail("data.streaming", d.streaming, "streaming reads files: set data.kind: files")
        if d.num_sequences < 1:
            _fail("data.num_sequences", d.num_sequences, "must be >= 1")
        if d.val_sequences < 0:
            _fail("data.val_sequences", d.val_sequences, "must be >= 0")


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
    # Expert-parallel all-to-all overlap (parallel/overlap.py): split every layer's rows into this many chunks so
    # that the dispatch of chunk i+1 and the combine of chunk i-1 run while chunk i's experts compute. 1 = off.
    a2a_overlap_chunks: int = 1
    # Training engine, one of ENGINES: fsdp (FSDP2) | deepspeed (the deepspeed: section; docs/deepspeed.md).
    engine: Engine = "fsdp"

    def validate(self) -> None:
        """The parallel section's own checks (validate(cfg): ep against model.moe.num_experts)."""
        for key in ("rendezvous_timeout_s", "collective_timeout_s"):
            if not getattr(self, key) > 0:
                _fail(f"parallel.{key}", getattr(self, key), "must be > 0 seconds")
        e = self.ep
        if e < 1:
            _fail("parallel.ep", e, "must be >= 1")
        w = self.world_size
        if w is not None and (w < 1 or w % e):
            _fail("parallel.world_size", w, f"must be a positive multiple of parallel.ep={e} (or null: any size)")
        c = self.a2a_overlap_chunks
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            _fail("parallel.a2a_overlap_chunks", c, "an integer >= 1 (1 = no overlap; >= 2 chunks the all-to-all of "
                  "every MoE layer so it runs while the experts compute, parallel/overlap.py)")


@dataclass
class DeepSpeedConfig:
    """The ``deepspeed:`` section (used when parallel.engine is deepspeed): a ZeRO stage, and optionally a DeepSpeed
    JSON file for DeepSpeed's other settings. Batch, accumulation, clipping, precision, optimizer and schedule
    always come from moe_train's own keys (DEEPSPEED_OWNED_KEYS): a JSON that sets them is refused."""

    stage: Optional[DeepSpeedStage] = None  # ZeRO stage, one of DEEPSPEED_STAGES; None = the JSON's, else 1
    config: Optional[str] = None  # path to a DeepSpeed JSON (zero_optimization buckets, overlap_comm, ...)


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
    dtype: AdakDtype = "float32"
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
    baseline: AdakBaseline = "greedy"
    running_mean_decay: float = 0.9
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    val_every: int = 0  # validation loss / mean k every n PPO steps (0 = only at the end)

    def validate(self) -> None:
        """The adak section's own checks (validate_adak: its k range against model.moe)."""
        a = self
        if a.k_min < 0:
            _fail("adak.k_min", a.k_min, "must be >= 0 (0 lets a token skip the layer's experts)")
        for key in ("lr", "clip_eps"):
            if not (getattr(a, key) > 0 and math.isfinite(getattr(a, key))):
                _fail(f"adak.{key}", getattr(a, key), "must be a finite number > 0")
        for key in ("weight_decay", "penalty", "entropy_coef"):
            if not (getattr(a, key) >= 0 and math.isfinite(getattr(a, key))):
                _fail(f"adak.{key}", getattr(a, key), "must be a finite number >= 0")
        for key in ("warm_start_steps", "ppo_steps", "val_every"):
            if getattr(a, key) < 0:
                _fail(f"adak.{key}", getattr(a, key), "must be >= 0")
        if a.warm_start_steps + a.ppo_steps == 0:
            # a run of neither stage would save the untrained allocator as final/model.pt and exit 0
            _fail("adak.warm_start_steps + adak.ppo_steps", 0, "nothing would train: set adak.warm_start_steps and/or "
                  "adak.ppo_steps > 0")
        for key in ("ppo_epochs", "ppo_minibatches"):
            if getattr(a, key) < 1:
                _fail(f"adak.{key}", getattr(a, key), "must be >= 1")
        if not 0 < a.warm_start_threshold <= 1:
            _fail("adak.warm_start_threshold", a.warm_start_threshold, "must be in (0, 1]")
        if a.dtype not in ADAK_DTYPES:
            _fail("adak.dtype", a.dtype, f"one of {ADAK_DTYPES}")
        if a.baseline not in ADAK_BASELINES:
            _fail("adak.baseline", a.baseline, f"one of {ADAK_BASELINES}")
        if not 0 <= a.running_mean_decay < 1:
            _fail("adak.running_mean_decay", a.running_mean_decay, "must be in [0, 1)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    adak: AdaKConfig = field(default_factory=AdaKConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` (int, float, str, bool, Optional, dataclass)."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a choice key: one of its list's values, of the values' own type (true is not 1)
        allowed = typing.get_args(tp)
        if value is None and path.endswith(".router"):  # the null-expert router's old name "null" is the usual victim
            raise ConfigError(f"{path}: expected a string, got nothing: YAML reads an unquoted null as no value; "
                              f"quote it, or for the null-expert router write its name (router: null_experts, or "
                              f"--set '{path}=null_experts')")
        if not any(type(value) is type(a) and value == a for a in allowed):
            shown = tuple(a for a in allowed if a not in ALIASES)  # old names load, but are not offered
            raise ConfigError(f"{path}={value!r} is not allowed: one of {shown}")
        return value
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
        if value is None:  # the null-expert router's old name "null" is the usual victim
            raise ConfigError(f"{path}: expected a string, got nothing: YAML reads an unquoted null as no value; "
                              f"quote it, or for the null-expert router write its name (router: null_experts, or "
                              f"--set '{path}=null_experts')")
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


_fail = config_fail  # ConfigError("{key}={value!r} is not allowed: {allowed}")


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
    if m.uses_mla:
        _validate_mla(m, p)
    elif m.head_dim is None and m.hidden_size % m.num_heads:
        _fail(f"{p}.hidden_size", m.hidden_size,
              f"must be divisible by num_heads={m.num_heads} (or set model.head_dim explicitly)")
    elif m.head_dim is not None and (m.head_dim < 2 or m.head_dim % 2):
        _fail(f"{p}.head_dim", m.head_dim, "must be an even number >= 2 (rotary embeddings rotate pairs)")
    elif m.resolved_head_dim % 2:
        _fail(f"{p}.hidden_size", m.hidden_size, "hidden_size / num_heads must be even for rotary embeddings")
    _validate_layers(m, p)
    if m.family == "longcat_flash":
        _validate_longcat(m, p)
    if m.num_heads % m.num_kv_heads:
        _fail(f"{p}.num_kv_heads", m.num_kv_heads, f"must divide num_heads={m.num_heads} (grouped-query attention)")
    if m.shared_expert_intermediate_size < 0:
        _fail(f"{p}.shared_expert_intermediate_size", m.shared_expert_intermediate_size, "must be >= 0")
    if m.rms_norm_eps <= 0:
        _fail(f"{p}.rms_norm_eps", m.rms_norm_eps, "must be > 0")
    if m.init_std <= 0:
        _fail(f"{p}.init_std", m.init_std, "must be > 0")
    validate_moe(m.moe, f"{p}.moe")


def _validate_longcat(m: ModelConfig, p: str) -> None:
    """LongCat-Flash's layer (model/longcat.py): two dense MLPs beside the shortcut MoE in EVERY layer, q-LoRA MLA,
    no shared experts, and zero-computation experts that return their input (null_kind identity)."""
    if m.dense_intermediate_size < 1:
        _fail(f"{p}.dense_intermediate_size", m.dense_intermediate_size,
              "must be >= 1 for longcat_flash: the width of the two dense MLPs of every layer (ffn_hidden_size)")
    if m.q_lora_rank is None:
        _fail(f"{p}.q_lora_rank", m.q_lora_rank, "must be set for longcat_flash (its MLA always has a low-rank query)")
    for key in ("first_k_dense_replace", "n_shared_experts", "shared_expert_intermediate_size"):
        if getattr(m, key):
            _fail(f"{p}.{key}", getattr(m, key), "must be 0 for longcat_flash (every layer has the same MoE block, "
                  "no shared experts)")
    if not m.moe.use_expert_bias:
        _fail(f"{p}.moe.use_expert_bias", m.moe.use_expert_bias, "true for longcat_flash (its router selects with "
              "e_score_correction_bias over the FFN and zero-computation experts)")
    if m.moe.num_null_experts and m.moe.null_kind != "identity":
        _fail(f"{p}.moe.null_kind", m.moe.null_kind, "identity for longcat_flash (its zero-computation experts "
              "return their input)")


def _validate_mla(m: ModelConfig, p: str) -> None:
    """DeepSeek multi-head latent attention (model/mla.py): every head has its own key and value (from the latent)."""
    if m.num_kv_heads != m.num_heads:
        _fail(f"{p}.num_kv_heads", m.num_kv_heads, f"must equal num_heads={m.num_heads} under MLA ({m.family}: "
              f"keys and values are expanded per head from the latent)")
    if m.q_lora_rank is not None and m.q_lora_rank < 1:
        _fail(f"{p}.q_lora_rank", m.q_lora_rank, "must be >= 1, or null for a full q_proj")
    for key in ("kv_lora_rank", "v_head_dim"):
        if getattr(m, key) < 1:
            _fail(f"{p}.{key}", getattr(m, key), "must be >= 1")
    if m.qk_nope_head_dim < 0:
        _fail(f"{p}.qk_nope_head_dim", m.qk_nope_head_dim, "must be >= 0")
    if m.qk_rope_head_dim < 2 or m.qk_rope_head_dim % 2:
        _fail(f"{p}.qk_rope_head_dim", m.qk_rope_head_dim, "must be an even number >= 2 (RoPE rotates pairs)")


def _validate_layers(m: ModelConfig, p: str) -> None:
    """Dense-first layers, DeepSeek shared experts and RoPE scaling."""
    if not 0 <= m.first_k_dense_replace < m.num_layers:
        _fail(f"{p}.first_k_dense_replace", m.first_k_dense_replace,
              f"must be in [0, num_layers - 1 = {m.num_layers - 1}] (at least one MoE layer)")
    if m.first_k_dense_replace and m.dense_intermediate_size < 1:
        _fail(f"{p}.dense_intermediate_size", m.dense_intermediate_size,
              f"must be >= 1: the first {m.first_k_dense_replace} layers are dense MLPs of this width")
    if m.dense_intermediate_size < 0:
        _fail(f"{p}.dense_intermediate_size", m.dense_intermediate_size, "must be >= 0")
    if m.n_shared_experts < 0:
        _fail(f"{p}.n_shared_experts", m.n_shared_experts, "must be >= 0")
    if m.n_shared_experts and m.shared_expert_intermediate_size:
        _fail(f"{p}.n_shared_experts", m.n_shared_experts, "ungated DeepSeek shared experts and the gated Qwen2-MoE "
              "shared expert (shared_expert_intermediate_size) exclude each other: set one of them to 0")
    r = m.rope_scaling
    if r.type not in ROPE_TYPES:
        _fail(f"{p}.rope_scaling.type", r.type, f"one of {ROPE_TYPES}")
    if r.type == "yarn":
        if not m.uses_mla:
            _fail(f"{p}.rope_scaling.type", r.type, f"yarn is implemented for the MLA families {MLA_FAMILIES} only")
        if not r.factor >= 1:
            _fail(f"{p}.rope_scaling.factor", r.factor, "must be >= 1 for yarn")
        if r.original_max_position_embeddings is None or r.original_max_position_embeddings < 1:
            _fail(f"{p}.rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings,
                  "must be >= 1 for yarn (the pre-training context length)")


def validate_moe(e: MoEConfig, p: str = "model.moe") -> None:
    if e.router not in router_names():  # the registry as it is now (a router registered after import too)
        _fail(f"{p}.router", e.router, f"one of {router_names()}")
    router = router_class(e.router)
    if e.num_experts < 1:
        _fail(f"{p}.num_experts", e.num_experts, "must be >= 1")
    if e.num_null_experts < 0:
        _fail(f"{p}.num_null_experts", e.num_null_experts, "must be >= 0")
    if e.null_tie_break not in NULL_TIE_BREAKS:
        _fail(f"{p}.null_tie_break", e.null_tie_break, f"one of {NULL_TIE_BREAKS} (see routing/null_experts.py)")
    if e.null_kind not in NULL_KINDS:
        _fail(f"{p}.null_kind", e.null_kind, f"one of {NULL_KINDS} (see routing/zero_compute.py)")
    _validate_router_conventions(e, p)
    router.validate_top_k(e, p)
    router.validate_config(e, p)  # the router's own rules, beside it (routing/base.py)
    router.validate_unread(e, p)
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
    if e.routing_backend not in ROUTING_BACKENDS:
        _fail(f"{p}.routing_backend", e.routing_backend, f"one of {ROUTING_BACKENDS}")
    why = router.kernel_excluded(e)
    if e.routing_backend == "triton" and why:
        _fail(f"{p}.routing_backend", e.routing_backend, f"auto or torch: the one-pass routing kernel computes the "
              f"plain softmax/sigmoid top-k only, and this router uses {why} (kernels/routing.py)")


def _validate_router_conventions(e: MoEConfig, p: str) -> None:
    """Score function, group-limited selection and routed scaling (routing/scores.py)."""
    if e.score_func not in SCORE_FUNCS:
        _fail(f"{p}.score_func", e.score_func, f"one of {SCORE_FUNCS}")
    if e.topk_method not in TOPK_METHODS:
        _fail(f"{p}.topk_method", e.topk_method, f"one of {TOPK_METHODS}")
    if not e.routed_scaling_factor > 0:
        _fail(f"{p}.routed_scaling_factor", e.routed_scaling_factor, "must be > 0")
    if e.n_group < 1 or e.num_experts % e.n_group:
        _fail(f"{p}.n_group", e.n_group, f"must be >= 1 and divide num_experts={e.num_experts}")
    if not 1 <= e.topk_group <= e.n_group:
        _fail(f"{p}.topk_group", e.topk_group, f"must be in [1, n_group={e.n_group}]")
    if e.topk_method == "noaux_tc" and e.n_group > 1 and e.num_experts // e.n_group < 2:
        _fail(f"{p}.n_group", e.n_group, "noaux_tc scores a group by its two best experts: each group needs >= 2 "
              f"experts (num_experts={e.num_experts})")
    if e.topk_method != "greedy":  # at most topk_group groups' experts are eligible (null experts aside)
        eligible = e.topk_group * (e.num_experts // e.n_group)
        k = router_class(e.router).max_slots(e) - (e.pickable_experts - e.num_experts)
        if k > eligible:
            _fail(f"{p}.topk_group", e.topk_group, f"leaves {eligible} eligible experts ({e.topk_group} of {e.n_group} "
                  f"groups of {e.num_experts // e.n_group}), fewer than the {k} true experts a token may need (top_k, or "
                  f"Ada-K's k_max); raise topk_group or lower k")


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
    """Every section's own checks (each dataclass's validate), then the checks across sections."""
    _check_finite(cfg, "")
    cfg.model.validate()
    cfg.train.validate()
    cfg.data.validate()
    cfg.parallel.validate()
    cfg.adak.validate()
    t = cfg.train
    if t.export_hf and cfg.model.moe.null_kind == "constant":
        _fail("train.export_hf", t.export_hf, "false with model.moe.null_kind: constant (no Hugging Face family has "
              "constant null experts; the run's final/model.pt carries them)")
    if t.seq_len > cfg.model.max_seq_len:
        _fail("train.seq_len", t.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    e = cfg.parallel.ep
    if e > cfg.model.moe.num_experts or cfg.model.moe.num_experts % e:
        _fail("parallel.ep", e, f"must divide model.moe.num_experts={cfg.model.moe.num_experts}")
    validate_adak(cfg.adak, cfg.model.moe)
    validate_engine(cfg)
    if t.compile and cfg.parallel.engine == "deepspeed" and deepspeed_stage(cfg.deepspeed) == 3:
        # measured (torch 2.13, DeepSpeed 0.19.8): Dynamo traces ZeRO-3's parameter-fetch hooks inside the compiled
        # blocks, hits its recompile limit and runs those frames eagerly; stage 2 trains compiled (docs/compile.md)
        _fail("train.compile", t.compile, "is not served under DeepSpeed's ZeRO stage 3: its per-module parameter "
              "hooks run inside the compiled blocks, exhaust torch.compile's recompile limit and fall back to eager; "
              "use deepspeed.stage 1 or 2, parallel.engine: fsdp, or train.compile: false")


def validate_adak(a: AdaKConfig, moe: MoEConfig, p: str = "adak") -> None:
    """The adak section against model.moe: its k range over the model's pickable experts."""
    n = moe.pickable_experts  # k counts picks over the true (+ null) experts
    if a.k_max is not None and not 1 <= a.k_max <= n:
        _fail(f"{p}.k_max", a.k_max, f"must be in [1, {n}] (model.moe's num_experts + num_null_experts) or null")
    k_max = n if a.k_max is None else a.k_max
    if a.k_min > k_max:
        _fail(f"{p}.k_min", a.k_min, f"must be <= k_max={k_max}")


def deepspeed_json(d: DeepSpeedConfig) -> dict:
    """The DeepSpeed JSON of ``deepspeed.config`` ({} without one), read and checked (ConfigError on any mistake)."""
    import json

    if d.config is None:
        return {}
    path = Path(d.config)
    if not path.is_file():
        _fail("deepspeed.config", d.config, "an existing DeepSpeed JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config={d.config!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        _fail("deepspeed.config", d.config, "a JSON object (DeepSpeed's config format)")
    owned = sorted(k for k in data if k in DEEPSPEED_OWNED_KEYS)
    if owned:
        raise ConfigError(f"deepspeed.config={d.config!r} sets {owned}: moe_train sets these from its own keys ("
                          + "; ".join(f"{k} <- {DEEPSPEED_OWNED_KEYS[k]}" for k in owned)
                          + "); remove them from the JSON")
    _check_deepspeed_keys(data, DEEPSPEED_KEYS, "", d.config)
    zero = data.get("zero_optimization", {})
    _check_deepspeed_zero(zero, d.config)
    if d.stage is not None and "stage" in zero and zero["stage"] != d.stage:
        raise ConfigError(f"deepspeed.stage={d.stage} conflicts with zero_optimization.stage={zero['stage']} in "
                          f"deepspeed.config={d.config!r}: set the stage in one place")
    return data


def _check_deepspeed_keys(section: dict, known: dict[str, str], prefix: str, file: str) -> None:
    """Every key of ``section`` is one DeepSpeed reads (``known``: key -> type), with that type."""
    import difflib

    for key, value in section.items():
        where = f"{prefix}{key}"
        if key in DEEPSPEED_EP_KEYS and not prefix:
            raise ConfigError(f"deepspeed.config={file!r}: '{key}' is not supported here: moe_train does the "
                              f"expert parallelism itself (set parallel.ep; docs/deepspeed.md), DeepSpeed's own MoE "
                              f"/ AutoEP sections would be ignored or clash; remove '{key}'")
        if key in DEEPSPEED_OFFLOAD_KEYS:
            raise ConfigError(f"deepspeed.config={file!r}: {where} is not supported here: moe_train's DeepSpeed "
                              f"engine steps its own AdamW on the device and does not offload optimizer state or "
                              f"parameters; remove {where}")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(sorted(known))}"
            raise ConfigError(f"deepspeed.config={file!r}: unknown key {where!r}, which DeepSpeed 0.19.8 does not read "
                              f"(it would be ignored); {hint}")
        kind = known[key]
        if not (value is None and kind.endswith("?")) and not _deepspeed_type_ok(value, kind.rstrip("?")):
            words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                     "map": "a JSON object"}[kind.rstrip("?")]
            raise ConfigError(f"deepspeed.config={file!r}: {where}={value!r} must be {words}"
                              f"{' or null' if kind.endswith('?') else ''}")


def _deepspeed_type_ok(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "int":  # DeepSpeed's pydantic ints take integral floats: "reduce_bucket_size": 5e8
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, {"float": (int, float), "bool": bool, "str": str, "map": dict}[kind])


def _check_deepspeed_zero(zero: Any, file: str) -> None:
    if not isinstance(zero, dict):
        _fail("deepspeed.config", file, "zero_optimization must be a JSON object")
    _check_deepspeed_keys(zero, DEEPSPEED_ZERO_KEYS, "zero_optimization.", file)
    stage = zero.get("stage")
    if stage is not None and (isinstance(stage, float) or stage not in DEEPSPEED_STAGES):
        # 2.5 must not become 2: the stage decides what is sharded
        raise ConfigError(f"deepspeed.config={file!r}: zero_optimization.stage={stage!r} must be one of "
                          f"{DEEPSPEED_STAGES}")


def deepspeed_stage(d: DeepSpeedConfig) -> int:
    """The resolved ZeRO stage: deepspeed.stage, else the JSON's zero_optimization.stage, else 1."""
    if d.stage is not None:
        return d.stage
    return int(deepspeed_json(d).get("zero_optimization", {}).get("stage", 1))


def validate_engine(cfg: Config) -> None:
    """parallel.engine and the deepspeed: section; combinations DeepSpeed cannot run fail here, before any work."""
    p, d = cfg.parallel, cfg.deepspeed
    if p.engine not in ENGINES:
        _fail("parallel.engine", p.engine, f"one of {ENGINES}")
    if p.engine != "deepspeed":
        return  # the deepspeed: section is kept and unused: switching engines touches nothing else
    if d.stage is not None and d.stage not in DEEPSPEED_STAGES:
        _fail("deepspeed.stage", d.stage, f"one of {DEEPSPEED_STAGES}")
    deepspeed_json(d)  # raises on a bad file or a conflicting key
    stage = deepspeed_stage(d)
    if stage not in DEEPSPEED_STAGES:
        _fail("deepspeed.config", d.config, f"zero_optimization.stage must be one of {DEEPSPEED_STAGES}")
    if stage == 3 and p.ep > 1:
        _fail("parallel.ep", p.ep, "DeepSpeed's ZeRO stage 3 does not run expert-parallel (native MoE) parameters "
              "(DeepSpeed: 'MoE not supported with Stage 3'); use deepspeed.stage 1 or 2 with ep > 1, or ep: 1 "
              "with stage 3")
