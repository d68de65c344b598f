"""The safetensors folder format: one model.safetensors, or shards named by model.safetensors.index.json.

Reading follows transformers' order of preference (the single file first). Writing plans shards greedily in file
order under a byte limit ("5GB" as transformers counts it) and writes the index with the total size. Files that
are not weights or config (tokenizer, generation config, README) can be carried from other folders into a new one.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"

# Files that describe weights or the model config: never carried over from an old folder into a new export.
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                    "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", ".*")

_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ----------------------------------------------------------------------------------------------------------
# reading


_SAFETENSORS_DTYPES = {**_SAFETENSORS_FLOATS, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Stored dtypes of quantized checkpoints (FP8 / FP4 / int8 / packed int4 weights): their values are not the model's
# weights until dequantized with scales moe_train does not apply, so they are refused by name at header time.
_QUANTIZED_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                     "F6_E2M3": "float6", "F6_E3M2": "float6", "F4": "float4", "I8": "int8", "U8": "uint8 / packed int4",
                     "I4": "int4", "U4": "uint4"}
# Every dtype a safetensors header may name (safetensors 0.8); anything else is a corrupt header.
_KNOWN_DTYPES = set(_SAFETENSORS_DTYPES) | set(_QUANTIZED_DTYPES) | {"U16", "U32", "U64", "C64"}
# Tensors that exist only in quantized layouts (FP8 block scales, GPTQ / AWQ, bitsandbytes), found by their names.
_QUANTIZED_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "qweight", "qzeros", "scales", "g_idx",
                       "SCB", "weight_format")


def _check_entry(name: str, meta) -> int:
    """One header entry's dtype, shape and offsets; returns its data end offset."""
    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
        raise ValueError(f"entry {name!r} is not a {{dtype, shape, data_offsets}} object")
    dtype, shape, offsets = meta["dtype"], meta.get("shape"), meta.get("data_offsets")
    if dtype not in _KNOWN_DTYPES:
        raise ValueError(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r} has bad data_offsets {offsets!r}")
    return offsets[1]


def _refuse_quantized(file: Path, header: dict) -> None:
    """Quantized dtypes first (the clearer message), then the names of quantized layouts' extra tensors."""
    for name, meta in header.items():
        if meta["dtype"] in _QUANTIZED_DTYPES:
            raise ValueError(f"{str(file)!r}: tensor {name!r} is stored as {meta['dtype']} "
                             f"({_QUANTIZED_DTYPES[meta['dtype']]}): quantized checkpoints are not supported; "
                             f"dequantize it to bf16 / fp32 first")
    for name in header:
        if name.rsplit(".", 1)[-1] in _QUANTIZED_SUFFIXES:
            raise ValueError(f"{str(file)!r}: tensor {name!r} is a quantization scale / packed weight: quantized "
                             f"checkpoints are not supported; dequantize it to bf16 / fp32 first")


def _read_header(file: Path) -> dict:
    """A safetensors file's JSON header, after checking that the file holds every byte the header promises (a
    truncated or half-copied file is named here, before any weight is read)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("its header is cut off")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((_check_entry(k, v) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e}); it is truncated or corrupted: "
                         f"copy or download it again") from None
    if 8 + n + end > size:
        raise ValueError(f"{str(file)!r} is truncated: its header promises {8 + n + end} bytes, the file has {size}; "
                         f"copy or download it again")
    _refuse_quantized(file, {k: v for k, v in header.items() if k != "__metadata__"})
    start = 8 + n  # the tensors' bytes follow the header; data_offsets count from here
    return {k: {**v, "file": file, "start": start} for k, v in header.items() if k != "__metadata__"}


class SafetensorsHeaders:
    """A folder's tensors from the files' headers alone: names, shapes and dtypes, and meta tensors from get().
    Checks a folder (every file present, complete, its tensors' shapes) without reading any weight."""

    def __init__(self, folder: Path):
        single, index = folder / SAFE_WEIGHTS_NAME, folder / SAFE_INDEX_NAME
        if single.is_file():
            self._where = {name: meta for name, meta in _read_header(single).items()}
            self.files = {single.name: single}
        elif index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
            self.files = {name: folder / name for name in sorted(set(weight_map.values()))}
            headers = {}
            for name, file in self.files.items():
                if not file.is_file():
                    raise ValueError(f"{index} lists shard {name!r}, which is missing from {str(folder)!r}")
                headers[name] = _read_header(file)
            self._where = {}
            for tensor_name, file_name in weight_map.items():
                if tensor_name not in headers[file_name]:
                    raise ValueError(f"{index} says {tensor_name!r} is in {file_name!r}, but that shard lacks it")
                self._where[tensor_name] = headers[file_name][tensor_name]
        else:
            raise ValueError(f"{str(folder)!r} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}; only safetensors "
                             f"checkpoints are read (re-save .bin checkpoints with save_pretrained)")

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        return [int(d) for d in self._where[name]["shape"]]

    def dtype_name(self, name: str) -> str:
        return self._where[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        dtype = _SAFETENSORS_DTYPES.get(self.dtype_name(name), torch.float32)
        return torch.empty(self.shape(name), dtype=dtype, device="meta")


class SafetensorsFolder(SafetensorsHeaders):
    """Name -> tensor over a folder's model.safetensors or its shards (model.safetensors.index.json).

    Each get() reads that tensor's bytes with one positioned read into a fresh tensor; the rows= form reads only a
    block of leading-dim rows (one rank's experts). No file is memory-mapped: pages of a mapping count in the
    process's resident memory for as long as it lives, and a rank reads only its share of a large model."""

    def __init__(self, folder: Path, stack: Optional[ExitStack] = None):
        super().__init__(folder)
        self._fds = {}
        for meta in self._where.values():
            if meta["file"] not in self._fds:
                self._fds[meta["file"]] = open(meta["file"], "rb")
                if stack is not None:
                    stack.callback(self._fds[meta["file"]].close)

    def close(self) -> None:
        for f in self._fds.values():
            f.close()

    def get(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The stored tensor (its dtype); ``rows=(lo, hi)``: rows [lo, hi) of its first dim only."""
        meta = self._where[name]
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{str(meta['file'])!r}: tensor {name!r} has dtype {meta['dtype']}, which moe_train does "
                             f"not read (quantized or FP8 checkpoints are not supported)")
        shape = [int(d) for d in meta["shape"]]
        begin, end = (int(x) for x in meta["data_offsets"])
        if rows is not None:
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = [rows[1] - rows[0], *shape[1:]]
        buf = bytearray(end - begin)
        f = self._fds[meta["file"]]
        got = os.preadv(f.fileno(), [buf], meta["start"] + begin) if buf else 0
        if got != len(buf):
            raise ValueError(f"{str(meta['file'])!r}: tensor {name!r} is cut short ({got} of {len(buf)} bytes read)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)


def stored_dtype(path: Union[str, Path]) -> torch.dtype:
    """The floating dtype a checkpoint's tensors are stored in (e.g. to convert bf16 -> bf16 without upcasting)."""
    with ExitStack() as stack:
        src = SafetensorsFolder(Path(path), stack)
        for name in sorted(src.names()):
            dtype = _SAFETENSORS_FLOATS.get(src.dtype_name(name))
            if dtype is not None:
                return dtype
    return torch.float32


# ----------------------------------------------------------------------------------------------------------
# writing


def parse_shard_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "2GiB" (2^30), "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size={size!r} must be >= 1 byte")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a string like '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "b").lower()
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} must be >= 1 byte")
    return value


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def plan_shards(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], limit: int) -> list[list[str]]:
    """Greedy in file order: a shard closes before the tensor that would push it past ``limit``. ``specs``: name ->
    (shape, dtype), in file order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _header(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], names: list[str]) -> bytes:
    """The safetensors header of a file holding ``names`` in this order (8-byte length, then JSON padded with spaces
    to a multiple of 8, as the safetensors library writes it)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape, dtype = specs[name]
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major order on the host (0-d tensors too), without a copy when it is a contiguous
    host tensor already (a file write takes the buffer as it is)."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_safetensors_stream(folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                             tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """model.safetensors, or shards plus an index past ``max_shard_bytes``, written as ``tensors`` arrive: (name,
    tensor) pairs in the order of ``specs`` (name -> (shape, dtype), known before any tensor is made), so a writer
    holds one tensor at a time (a streamed export of a model no process holds whole)."""
    shards = plan_shards(specs, max_shard_bytes)
    files = [SAFE_WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
    order = [(j, name) for j, names in enumerate(shards) for name in names]
    stream = iter(tensors)
    for j, names in enumerate(shards):
        with open(folder / files[j], "wb") as f:
            f.write(_header(specs, names))
            for name in names:
                got, t = next(stream)
                shape, dtype = specs[name]
                assert got == name and tuple(t.shape) == tuple(shape) and t.dtype == dtype, \
                    (got, name, tuple(t.shape), shape, t.dtype, dtype)
                f.write(tensor_bytes(t))
    assert next(stream, None) is None and len(order) == len(specs)
    if len(shards) > 1:
        total = sum(_nbytes(*spec) for spec in specs.values())
        weight_map = {name: files[j] for j, name in order}
        with open(folder / SAFE_INDEX_NAME, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``tensors`` (HF name -> tensor, in file order) as model.safetensors, or as shards plus an index when they
    exceed ``max_shard_bytes``."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    write_safetensors_stream(folder, specs, tensors.items(), max_shard_bytes)


def _is_weight_or_config(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in _WEIGHT_PATTERNS)


def copy_non_weight_files(sources: Iterable[Union[str, Path]], folder: Path) -> None:
    """Copies the files of the ``sources`` folders that are not weights or config.json (tokenizer, generation
    config, README) into ``folder``, later sources winning; sources that are not folders are skipped."""
    for src in sources:
        src = Path(src)
        if not src.is_dir():
            continue
        for entry in sorted(src.iterdir()):
            if _is_weight_or_config(entry.name):
                continue
            target = folder / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            if entry.is_dir():
                shutil.copytree(entry, target)
            else:
                shutil.copy2(entry, target)
