"""The dp x ep layout's rules, checked before any process group exists (launch, the distributed setup, the
planner and preflight all call this one function)."""

from __future__ import annotations

import math

from moe_train.config import ENGINE_FACTS, Config, ModelConfig, TrainConfig


def validate_layout(world_size: int, ep: int, num_experts: int) -> None:
    """Every layout mistake, as a ValueError, before any process group exists."""
    if ep < 1:
        raise ValueError(f"parallel.ep={ep} must be >= 1")
    if ep > num_experts:
        raise ValueError(f"parallel.ep={ep} exceeds model.moe.num_experts={num_experts}: every expert-parallel rank "
                         f"must hold at least one expert; use ep <= {num_experts}")
    if num_experts % ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"model.moe.num_experts={num_experts} is not divisible by parallel.ep={ep}: each rank holds "
                         f"num_experts/ep experts; use ep in {divisors}")
    if world_size % ep:
        raise ValueError(f"WORLD_SIZE={world_size} is not divisible by parallel.ep={ep}: the world is dp x ep ranks; "
                         f"launch a multiple of {ep} processes (e.g. torchrun --nproc_per_node {ep}) or change "
                         f"parallel.ep")


def fsdp_dim1_widths(model: ModelConfig, train: TrainConfig) -> dict[str, int]:
    """The widths FSDP2 shards on dim 1 over the expert-data-parallel group, by the config key that sets each:
    parallel/parallelize.py shards every expert tensor on dim 1 (dim 0 is the ep split), i.e. w_gate / w_up
    [E, D, F] and w_down [E, F, D] on D and F, and with LoRA on the experts the adapters [E, D|F, r] and [E, r, .]
    on D, F and the rank r."""
    widths = {"model.hidden_size": model.hidden_size, "model.intermediate_size": model.intermediate_size}
    if train.lora_rank and "experts" in train.lora_targets:
        widths["train.lora_rank"] = train.lora_rank
    return widths


def validate_fsdp_sharding(world_size: int, ep: int, widths: dict[str, int]) -> None:
    """torch 2.13's FSDP2 pads an uneven shard on dim 0 but refuses one on any other dim (NotImplementedError
    "FSDP does not support uneven sharding", torch/distributed/fsdp/_fully_shard/_fsdp_param.py), and only after the
    model is built: every dim-1 width must be a multiple of the expert-data-parallel size world / ep."""
    edp = world_size // ep if ep >= 1 and world_size % ep == 0 else 1
    for key, width in widths.items():
        if edp > 1 and width % edp:
            common = 0
            for w in widths.values():
                common = math.gcd(common, w)
            ok = [ep * d for d in range(1, common + 1) if common % d == 0][:12]
            raise ValueError(f"{key}={width} is not divisible by the {edp} expert-data-parallel ranks (WORLD_SIZE="
                             f"{world_size} / parallel.ep={ep}): FSDP2 shards every expert weight on this width "
                             f"and cannot shard it unevenly; launch WORLD_SIZE in {ok} (parallel.ep x a common "
                             f"divisor of {', '.join(f'{k}={w}' for k, w in widths.items())}) or change {key}")


def validate_fsdp_config(cfg: Config, world_size: int, model: ModelConfig | None = None, what: str = "") -> None:
    """validate_fsdp_sharding for a run of ``cfg`` (its model, or ``model``: the architecture actually trained) at
    ``world_size`` ranks; nothing to check for an engine that does not shard with FSDP2 (DeepSpeed's ZeRO flattens
    and pads). ``what`` prefixes the error."""
    if not ENGINE_FACTS[cfg.parallel.engine].fsdp2:
        return
    try:
        validate_fsdp_sharding(world_size, cfg.parallel.ep, fsdp_dim1_widths(model or cfg.model, cfg.train))
    except ValueError as e:
        raise ValueError(f"{what}{e}") from None
