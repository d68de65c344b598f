"""A whole model in one file (``model.pt``): the final model of a run, or a base model to start from.

Format: one torch file {"format": 1, "model_config": dict, "step": int, "model": state_dict}, written atomically
(io/atomic.py): a crash mid-save leaves the previous file intact. Resumable training state (optimizer, data
position, RNG, sharded over ranks) is io/dcp_checkpoint.py.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from moe_train.config import ModelConfig, from_dict, to_dict
from moe_train.io.atomic import write_file_atomically
from moe_train.io.safetensors_folder import tensor_bytes
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


# ----------------------------------------------------------------------------------------------------------
# Streaming: a model.pt that no process holds whole. The file is torch.save's own zip format (torch.load reads
# it): data.pkl, whose tensors point at records data/<key>, is written first with every record's space reserved;
# then each tensor's bytes are written into its record as the tensor arrives (one at a time: a caller gathers one
# parameter of a sharded model, writes it, drops it). The reader reads one record per tensor with plain reads
# (never a memory map: mapped pages count in the process's resident memory while the mapping lives).


class _Storage:
    """Stands for a tensor's storage in data.pkl (persistent id ``("storage", type, key, "cpu", numel)``)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Slot:
    """Pickles as the tensor torch.save would write for a contiguous tensor of ``shape`` and ``dtype``."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride = torch.empty(self.shape, device="meta").stride()
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


_STORAGE_DTYPES = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


def _storage_type(dtype: torch.dtype):
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])  # as torch.save names it


def _record_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Zip member name -> (offset of its data in the file, size). torch writes members uncompressed."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def save_model_stream(path: str | Path, config: ModelConfig, step: int,
                      specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], write: bool = True) -> Path:
    """``model.pt`` (the format of save_model) from ``tensors``: (name, tensor) pairs arriving in the order of
    ``specs`` (name -> (shape, dtype), the state dict's). Atomic like save_model. ``write=False``: only consume
    ``tensors`` (the other ranks of a collective gather, whose tensors rank 0 writes)."""
    if not write:
        for _ in tensors:
            pass
        return Path(path)
    slots = {name: _Slot(_Storage(str(i), dtype, math.prod(shape)), tuple(shape))
             for i, (name, (shape, dtype)) in enumerate(specs.items())}
    payload = {"format": FORMAT, "model_config": to_dict(config), "step": step, "model": slots}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return "storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel
            return None

    def write_file(tmp: Path) -> None:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(payload)
        zw = torch._C.PyTorchFileWriter(str(tmp), False, 64)  # no crc32: the records are filled in afterwards
        zw.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
        for name, value in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", sys.byteorder)):
            zw.write_record(name, value, len(value))
        for name, slot in slots.items():
            zw.write_record_metadata(f"data/{slot.storage.key}", _nbytes(specs[name]))
        zw.write_end_of_file()
        del zw
        offsets = _record_offsets(tmp)
        prefix = next(n for n in offsets if n.endswith("/data.pkl"))[: -len("data.pkl")]
        stream = iter(tensors)
        with open(tmp, "r+b") as out:
            for name, slot in slots.items():
                got, t = next(stream)
                assert got == name and tuple(t.shape) == slot.shape and t.dtype == specs[name][1], \
                    (got, name, tuple(t.shape), slot.shape, t.dtype)
                offset, size = offsets[f"{prefix}data/{slot.storage.key}"]
                data = tensor_bytes(t)
                assert len(data) == size, (name, len(data), size)
                out.seek(offset)
                out.write(data)
        assert next(stream, None) is None

    return write_file_atomically(path, write_file, by_name=True)


def _nbytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    shape, dtype = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ModelFileReader:
    """One tensor of a model.pt at a time: ``config``, ``step``, ``specs`` (name -> (shape, dtype)) from data.pkl,
    ``get(name, rows=(lo, hi))`` reads that tensor (or a block of its leading-dim rows) from its record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offsets = _record_offsets(self.path)
        self._prefix = next(n for n in self._offsets if n.endswith("/data.pkl"))[: -len("data.pkl")]
        data = self._read(*self._offsets[self._prefix + "data.pkl"])  # positioned reads: no crc (a streamed file)
        reader = self

        class Unpickler(pickle.Unpickler):  # only what a model.pt holds; tensors become record references
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return reader._tensor_ref
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]  # persistent_load receives the dtype
                raise pickle.UnpicklingError(f"{str(reader.path)!r}: unexpected {module}.{name} in a model file")

            def persistent_load(self, pid):
                _, dtype, key, _location, numel = pid
                return key, dtype, numel

        payload = Unpickler(io.BytesIO(data)).load()
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{str(self.path)!r} is not a moe_train model checkpoint (format {FORMAT})")
        self.config = from_dict(ModelConfig, payload["model_config"], "model_config")
        self.step = payload.get("step", 0)
        self._refs = payload["model"]
        self.specs = {name: (ref["shape"], ref["dtype"]) for name, ref in self._refs.items()}

    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [buf], offset) if size else 0
        if got != size:
            raise ValueError(f"{str(self.path)!r} is truncated: a record ends past the end of the file")
        return buf

    @staticmethod
    def _tensor_ref(storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
        key, dtype, _ = storage
        return {"key": key, "dtype": dtype, "offset": offset, "shape": tuple(shape), "stride": tuple(stride)}

    def get(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        ref = self._refs[name]
        shape, dtype = ref["shape"], ref["dtype"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        start, size = self._offsets[f"{self._prefix}data/{ref['key']}"]
        contiguous = ref["stride"] == torch.empty(shape, device="meta").stride()
        lo, hi = (0, shape[0] if shape else 1) if rows is None or not contiguous else rows
        row = math.prod(shape[1:]) * itemsize if shape else itemsize
        begin = start + ref["offset"] * itemsize + lo * row
        n = (hi - lo) * row if contiguous else size
        buf = self._read(begin if contiguous else start, n)
        flat = torch.frombuffer(buf, dtype=dtype) if n else torch.empty(0, dtype=dtype)
        if not contiguous:  # written by torch.save from a view: rebuild it, then take the rows
            t = flat.as_strided(shape, ref["stride"], ref["offset"])
            return (t if rows is None else t[rows[0]:rows[1]]).clone()
        return flat.reshape((hi - lo, *shape[1:]) if shape else ())
