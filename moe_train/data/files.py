"""Local data files through Hugging Face `datasets`: a file, a folder or a glob of text / jsonl / parquet files,
read as token ids per document. Nothing is downloaded."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator, Optional

from moe_train.config import DATA_FORMATS, DataConfig

# file suffix -> datasets builder; the builders are config.DATA_FORMATS (the one list) less "auto"
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
assert set(FORMATS.values()) == set(DATA_FORMATS) - {"auto"}, (FORMATS, DATA_FORMATS)


def resolve_files(path: str, fmt: str = "auto", key: str = "data.path") -> tuple[str, list[str]]:
    """(datasets builder name, sorted file list) for a file, a folder or a glob; ``key`` names it in errors."""
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix in FORMATS)
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"{key}={path!r} does not exist (expected a file, a folder or a glob)")
    if not files:
        raise ValueError(f"{key}={path!r} matches no data files ({', '.join(sorted(FORMATS))})")
    if fmt == "auto":
        kinds = {FORMATS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"{key}={path!r}: cannot infer one format from the file suffixes "
                             f"{sorted({Path(f).suffix for f in files})}; set data.format to one of "
                             f"{', '.join(f for f in DATA_FORMATS if f != 'auto')}")
        fmt = kinds.pop()
    return fmt, files


def document_ids(cfg: DataConfig, path: str, tokenizer, streaming: bool,
                 field_override: Optional[str] = None) -> Iterator[list[int]]:
    """Token ids of every document in file order, each followed by the tokenizer's EOS (pre-tokenised data as is).
    ``field_override`` reads another pre-tokenised list column instead (per-token labels, data.label_field)."""
    # optional dependency (the `hf` extra): only file-backed data needs it
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    fmt, files = resolve_files(path, cfg.format)
    try:
        ds = load_dataset(fmt, data_files=files, split="train", streaming=streaming)
    except Exception as e:  # datasets' and pyarrow's errors on a file they cannot parse
        raise _unreadable(path, fmt, e) from e
    field = field_override or cfg.token_field or cfg.text_field
    columns = ds.column_names if not streaming else None
    if columns is not None and field not in columns:
        key = "label_field" if field_override else "token_field" if cfg.token_field else "text_field"
        raise ValueError(f"data: the files under {path!r} have no column {field!r} (columns: {columns}); "
                         f"set data.{key}")
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a malformed record deeper than the preflight's sample (streaming)
            raise _unreadable(path, fmt, e) from e
        if field not in row or row[field] is None:
            raise ValueError(f"data: a record in {path!r} has no field {field!r}")
        if cfg.token_field or field_override:
            if not isinstance(row[field], (list, tuple)):
                raise ValueError(f"data: a record in {path!r} holds {row[field]!r} in {field!r}, not a list of ids")
            yield list(row[field])
        else:
            if not isinstance(row[field], str):
                raise ValueError(f"data: a record in {path!r} holds {row[field]!r} in {field!r}, not text")
            yield tokenizer.encode(row[field]) + [tokenizer.eos_id]


def _unreadable(path: str, fmt: str, e: Exception) -> ValueError:
    cause = e.__cause__ or e
    first = str(cause).splitlines()[0] if str(cause) else ""
    return ValueError(f"data: the files under {path!r} cannot be read as {fmt} ({type(cause).__name__}: "
                      f"{first[:300]}); fix the file or set data.format")
