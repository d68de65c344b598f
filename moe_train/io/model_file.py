"""A whole model in one file (``model.pt``): the final model of a run, or a base model to start from.

Format: one torch file {"format": 1, "model_config": dict, "step": int, "model": state_dict}, written atomically
(io/atomic.py): a crash mid-save leaves the previous file intact. Resumable training state (optimizer, data
position, RNG, sharded over ranks) is io/dcp_checkpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_train.config import ModelConfig, from_dict, to_dict
from moe_train.io.atomic import write_file_atomically
from moe_train.model import MoETransformer, build_model

FORMAT = 1


def save_model(model: MoETransformer, path: str | Path, step: int = 0, state_dict: dict | None = None) -> Path:
    """``state_dict``: the full tensors when the model is parallelized (moe_train.parallel.full_state_dict)."""
    state = model.state_dict() if state_dict is None else state_dict
    payload = {"format": FORMAT, "model_config": to_dict(model.config), "step": step,
               "model": {k: v.detach().cpu() for k, v in state.items()}}
    return write_file_atomically(path, lambda f: torch.save(payload, f))


def load_model(path: str | Path) -> MoETransformer:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupted file
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                         "it is corrupted or half-written") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a moe_train model checkpoint (format {FORMAT})")
    model = build_model(from_dict(ModelConfig, payload["model_config"], "model_config"))
    model.load_state_dict(payload["model"])
    return model
