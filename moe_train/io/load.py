"""One loader for every model format moe_train accepts: ``train.init_from``, ``eval --checkpoint`` and Ada-K's base
model all come through here, so they accept the same paths and fail with the same message.

    a folder  -> a Hugging Face folder (config.json + safetensors), io/hf.py
    a file    -> a moe_train model file (model.pt), io/model_file.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from moe_train.config import ModelConfig, from_dict, validate_model
from moe_train.io.hf import check_hf, from_hf
from moe_train.io.model_file import FORMAT, load_model
from moe_train.model import MoETransformer


def check_any(path: Union[str, Path], what: str = "model path") -> "ModelConfig":
    """The ModelConfig of the model at ``path`` (a Hugging Face folder or a moe_train model file), checked without
    reading the weights: everything load_any would refuse is refused here first, as a ValueError naming ``what``."""
    path = Path(path)
    if path.is_dir():
        try:
            return check_hf(path)
        except ValueError as e:
            raise ValueError(f"{what}={str(path)!r}: {e}") from None
    if not path.is_file():
        raise ValueError(f"{what}={str(path)!r} does not exist; expected a moe_train model file (model.pt) or a "
                         f"Hugging Face model folder (config.json + safetensors)")
    try:  # mmap: the archive's directory and the config are read, the tensors' bytes are not
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupted or not a torch file at all
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{what}={str(path)!r} cannot be read as a moe_train model file ({type(e).__name__}: "
                         f"{first}); it is corrupted, half-written or not a model.pt") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model_config" not in payload:
        raise ValueError(f"{what}={str(path)!r} is not a moe_train model file (format {FORMAT}); give a model.pt "
                         f"written by moe-train or a Hugging Face folder")
    try:
        cfg = from_dict(ModelConfig, payload["model_config"], "model_config")
        validate_model(cfg)
    except ValueError as e:
        raise ValueError(f"{what}={str(path)!r} holds an invalid model config: {e}") from None
    return cfg


def load_any(path: Union[str, Path], dtype: Optional[torch.dtype] = torch.float32) -> MoETransformer:
    """The model at ``path``: a Hugging Face folder or a moe_train model file.

    ``dtype``: what a Hugging Face folder's floating tensors are cast to as they are read (None keeps the stored
    dtype). A moe_train model file comes back exactly as saved: it records the dtype it was trained in, and a caller
    that wants another casts it with its own rules (Ada-K keeps its fp32 allocators).
    """
    path = Path(path)
    if path.is_dir():
        return from_hf(path, dtype=dtype)
    if path.is_file():
        return load_model(path)
    raise ValueError(f"model path {str(path)!r} does not exist; expected a moe_train model file (model.pt) or a "
                     f"Hugging Face model folder (config.json + safetensors)")
