"""Where a rank reads its shards from: a moe_train model file or a Hugging Face folder, one tensor (or one block of
experts) at a time, under our state-dict names in the source model's own architecture (``config``).

    source.config                    the stored model's ModelConfig
    source.specs                     our name -> (global shape, stored dtype), in state-dict order
    source.get(name, experts=None)   that tensor; for a stacked expert tensor, ``experts=(lo, hi)`` reads those
                                     experts only (the others' bytes are never read)

train/build.py fills a model that was built on the meta device and sharded from here; nothing reads the whole model.
A Hugging Face folder is read a decoder layer at a time (its tensors are named per expert and stored transposed:
io/hf_weights.py import_layer does the mapping); the layer in hand is cached until the next one is asked for.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Protocol, Union

import torch

from moe_train.config import ModelConfig
from moe_train.io.hf import check_hf
from moe_train.io.hf_weights import WeightImporter, import_globals, import_layer
from moe_train.io.model_file import ModelFileReader
from moe_train.io.safetensors_folder import SafetensorsFolder
from moe_train.model.decoder import MoETransformer

_LAYER = re.compile(r"layers\.(\d+)\.")


class StateSource(Protocol):
    config: ModelConfig
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    experts: Optional[tuple[int, int]]  # the block of experts a layer read holds (a Hugging Face folder's)

    def get(self, name: str, experts: Optional[tuple[int, int]] = None) -> torch.Tensor: ...

    def forget(self) -> None: ...


class ModelFileSource:
    """A model.pt, read one record (or one block of expert rows) at a time."""

    def __init__(self, path: Union[str, Path]):
        self.reader = ModelFileReader(path)
        self.config, self.specs = self.reader.config, self.reader.specs
        self.experts = None  # unused: each get names its rows

    def forget(self) -> None:
        pass

    def get(self, name: str, experts: Optional[tuple[int, int]] = None) -> torch.Tensor:
        return self.reader.get(name, rows=experts)


class HFSource:
    """A Hugging Face folder (checked whole from its headers first: check_hf), read a decoder layer at a time."""

    def __init__(self, path: Union[str, Path], stack: ExitStack, experts: Optional[tuple[int, int]] = None):
        folder = Path(path)
        self.experts = experts  # the block of experts this rank holds: a layer is read with those only
        self.config = check_hf(folder)
        with torch.device("meta"):
            self._expected = MoETransformer(self.config).state_dict()
        self.specs = {n: (tuple(t.shape), t.dtype) for n, t in self._expected.items()}
        self._imp = WeightImporter(SafetensorsFolder(folder, stack), None, folder)
        self._cache: tuple[object, dict[str, torch.Tensor]] = (None, {})

    def forget(self) -> None:
        """Drops the cached layer (the next get reads again, with the current ``experts``)."""
        self._cache = (None, {})

    def get(self, name: str, experts: Optional[tuple[int, int]] = None) -> torch.Tensor:
        assert experts is None or experts == (self.experts or (0, self.config.moe.num_experts)), (experts, self.experts)
        m = _LAYER.match(name)
        key = ("layer", int(m.group(1))) if m else ("globals",)
        if self._cache[0] != key:  # the next part: drop the previous one
            self._cache = (None, {})
            part = import_layer(self._imp, self.config, self._expected, key[1], self.experts) if m else \
                import_globals(self._imp, self.config, self._expected)
            self._cache = (key, part)
        part = self._cache[1]
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return part["embed_tokens.weight"]
        return part[name]


def open_source(path: Union[str, Path], stack: ExitStack, experts: Optional[tuple[int, int]] = None) -> StateSource:
    """The source at ``path`` (load_any's rule: a folder is a Hugging Face folder, a file a model.pt); ``experts``:
    the block of experts the caller will read (a Hugging Face folder's layers are read with those only)."""
    path = Path(path)
    if path.is_dir():
        return HFSource(path, stack, experts)
    if path.is_file():
        return ModelFileSource(path)
    raise ValueError(f"model path {str(path)!r} does not exist; expected a moe_train model file (model.pt) or a "
                     f"Hugging Face model folder (config.json + safetensors)")


def meta_model_with_routers(source: StateSource) -> MoETransformer:
    """The source's architecture on the meta device, its routers read for real (fp32): they are small, and the
    conversions on load (io/convert.py, io/adak_convert.py) need their values; nothing else is read."""
    with torch.device("meta"):
        model = MoETransformer(source.config)
    experts = getattr(source, "experts", None)
    source.experts = (0, 0)  # a Hugging Face folder: read each layer's router without its experts
    for i, layer in enumerate(model.layers):
        if layer.moe is None:
            continue
        router = layer.moe.router.to_empty(device="cpu")
        with torch.no_grad():
            for rel, t in router.state_dict(keep_vars=True).items():
                t.copy_(source.get(f"layers.{i}.moe.router.{rel}").float())
        router.float()
    source.experts = experts
    source.forget()
    return model
