"""One loader for every model format moe_train accepts: ``train.init_from``, ``eval --checkpoint`` and Ada-K's base
model all come through here, so they accept the same paths and fail with the same message.

    a folder  -> a Hugging Face folder (config.json + safetensors), io/hf.py
    a file    -> a moe_train model file (model.pt), io/model_file.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from moe_train.io.hf import from_hf
from moe_train.io.model_file import load_model
from moe_train.model import MoETransformer


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
