"""moe_train: expert-parallel MoE training with per-token variable k (AdaMoE null experts, Ada-K routing)."""

from moe_train.config import Config, ConfigError, ModelConfig, MoEConfig, load_config
from moe_train.model import MoETransformer, build_model

__version__ = "0.1.0"


def from_hf(path, **kwargs):
    """Imports a Hugging Face Mixtral / Qwen2-MoE checkpoint folder (config.json + safetensors) as a model."""
    from moe_train.io.hf import from_hf as _from_hf

    return _from_hf(path, **kwargs)


def to_hf(model, path, **kwargs):
    """Exports a model to a Hugging Face folder (null gates and allocators kept as extra tensors)."""
    from moe_train.io.hf import to_hf as _to_hf

    return _to_hf(model, path, **kwargs)


__all__ = ["Config", "ConfigError", "ModelConfig", "MoEConfig", "load_config", "MoETransformer", "build_model",
           "from_hf", "to_hf"]
