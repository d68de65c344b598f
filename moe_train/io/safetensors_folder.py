"""The safetensors folder format: one model.safetensors, or shards named by model.safetensors.index.json.

Reading follows transformers' order of preference (the single file first). Writing plans shards greedily in file
order under a byte limit ("5GB" as transformers counts it) and writes the index with the total size. Files that
are not weights or config (tokenizer, generation config, README) can be carried from other folders into a new one.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"

# Files that describe weights or the model config: never carried over from an old folder into a new export.
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                    "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", ".*")

_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ----------------------------------------------------------------------------------------------------------
# reading


class SafetensorsFolder:
    """Name -> tensor over a folder's model.safetensors or its shards (model.safetensors.index.json)."""

    def __init__(self, folder: Path, stack: ExitStack):
        single, index = folder / SAFE_WEIGHTS_NAME, folder / SAFE_INDEX_NAME
        if single.is_file():  # transformers' order of preference
            files = {single.name: single}
            handle = stack.enter_context(safe_open(str(single), framework="pt"))
            self._where = {name: handle for name in handle.keys()}
        elif index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
            files = {name: folder / name for name in sorted(set(weight_map.values()))}
            for name, file in files.items():
                if not file.is_file():
                    raise ValueError(f"{index} lists shard {name!r}, which is missing from {str(folder)!r}")
            handles = {name: stack.enter_context(safe_open(str(file), framework="pt")) for name, file in files.items()}
            self._where = {}
            for tensor_name, file_name in weight_map.items():
                if tensor_name not in set(handles[file_name].keys()):
                    raise ValueError(f"{index} says {tensor_name!r} is in {file_name!r}, but that shard lacks it")
                self._where[tensor_name] = handles[file_name]
        else:
            raise ValueError(f"{str(folder)!r} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}; only safetensors "
                             f"checkpoints are read (re-save .bin checkpoints with save_pretrained)")
        self.files = files

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        return list(self._where[name].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._where[name].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


_SAFETENSORS_DTYPES = {**_SAFETENSORS_FLOATS, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


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
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e}); it is truncated or corrupted: "
                         f"copy or download it again") from None
    if 8 + n + end > size:
        raise ValueError(f"{str(file)!r} is truncated: its header promises {8 + n + end} bytes, the file has {size}; "
                         f"copy or download it again")
    return {k: v for k, v in header.items() if k != "__metadata__"}


class SafetensorsHeaders:
    """SafetensorsFolder's interface from the files' headers alone: shapes and dtypes, and meta tensors from get().
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


def plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy in file order: a shard closes before the tensor that would push it past ``limit``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``tensors`` (HF name -> tensor, in file order) as model.safetensors, or as shards plus an index when they
    exceed ``max_shard_bytes``."""
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(folder / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for j, names in enumerate(shards):
        file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(folder / SAFE_INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


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
