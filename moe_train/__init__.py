"""moe_train: expert-parallel MoE training with per-token variable k (AdaMoE null experts, Ada-K routing)."""

from moe_train.config import Config, ConfigError, ModelConfig, MoEConfig, load_config
from moe_train.io.hf import from_hf, to_hf  # every family's Hugging Face folder <-> MoETransformer
from moe_train.model import MoETransformer, build_model

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "ModelConfig", "MoEConfig", "load_config", "MoETransformer", "build_model",
           "from_hf", "to_hf"]
