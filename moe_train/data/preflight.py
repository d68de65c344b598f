"""The data checks a run makes before any process group or model exists (issue 17): every file of data.path and
data.val_path opens, decodes as UTF-8, holds the configured field, its token ids are integers in [0, vocab), and the
corpus holds at least one sequence of train.seq_len + 1 tokens.

Cheap by construction: files up to FULL_SCAN_BYTES are read whole (every record checked), larger ones by their
first SAMPLE_RECORDS records plus a UTF-8 scan of their first SCAN_BYTES. A mistake deeper in a large file is still
reported clearly by the loader (moe_train/data/files.py), only later. Every failure is a ValueError naming the
config key, the file (and line), the value, and the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moe_train.config import Config
from moe_train.data.files import resolve_files
from moe_train.data.tokenizers import build_tokenizer

SAMPLE_RECORDS = 256
FULL_SCAN_BYTES = 8 << 20
SCAN_BYTES = 64 << 20


class _Split:
    def __init__(self):
        self.tokens = 0
        self.records = 0
        self.complete = True  # every record of every file was counted


def _fail(key: str, file: str, where: str, problem: str) -> None:
    raise ValueError(f"{key}: {file}{where}: {problem}")


def _decode(key: str, file: Path) -> tuple[str, bool]:
    """The file's text (whole when small, else its first SCAN_BYTES) and whether that is the whole file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(min(size, SCAN_BYTES) if size > FULL_SCAN_BYTES else size)
    whole = len(raw) == size
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not whole and e.start >= len(raw) - 3:  # a character cut by the sample's end
            text = raw[:e.start].decode("utf-8")
        else:
            line = raw.count(b"\n", 0, e.start) + 1
            _fail(key, str(file), f" line {line}", f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                  "re-encode the file as UTF-8")
    if not whole:
        text = text[: text.rfind("\n") + 1]  # whole lines only
    return text, whole


def _check_ids(key: str, file: str, where: str, field: str, value, vocab_size: int, cfg_key: str) -> int:
    if not isinstance(value, list):
        _fail(key, file, where, f"field {field!r} must be a list of token ids, got {type(value).__name__} "
              f"{str(value)[:40]}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            shown = "NaN" if isinstance(v, float) and math.isnan(v) else repr(v)[:20]
            _fail(key, file, where, f"field {field!r} holds {shown}: token ids must be integers in "
                  f"[0, {vocab_size}) (data.{cfg_key})")
        if not 0 <= v < vocab_size:
            _fail(key, file, where, f"token id {v} is outside the model's vocabulary [0, {vocab_size}) "
                  f"(model.vocab_size={vocab_size}); the data was tokenised for another vocabulary")
    return len(value)


def _check_record(cfg: Config, key: str, file: str, where: str, row, tokenizer, vocab_size: int) -> int:
    d = cfg.data
    if not isinstance(row, dict):
        _fail(key, file, where, f"a record must be a JSON object with field {d.token_field or d.text_field!r}, "
              f"got {type(row).__name__}")
    field = d.token_field or d.text_field
    if field not in row:
        which = "token_field" if d.token_field else "text_field"
        _fail(key, file, where, f"no field {field!r} (data.{which}); the record has {sorted(row)[:10]}: set "
              f"data.{which} to one of them")
    if d.token_field:
        n = _check_ids(key, file, where, field, row[field], vocab_size, "token_field")
        if d.label_field:
            if d.label_field not in row:
                _fail(key, file, where, f"no field {d.label_field!r} (data.label_field); the record has "
                      f"{sorted(row)[:10]}")
            labels = row[d.label_field]
            if not isinstance(labels, list) or len(labels) != n:
                _fail(key, file, where, f"field {d.label_field!r} (data.label_field) must be a list as long as "
                      f"{field!r} ({n})")
        return n
    text = row[field]
    if not isinstance(text, str):
        _fail(key, file, where, f"field {field!r} (data.text_field) must be text, got {type(text).__name__} "
              f"{str(text)[:40]}; pre-tokenised ids go in data.token_field")
    return len(tokenizer.encode(text)) + 1


def _check_json_file(cfg: Config, key: str, file: Path, tokenizer, vocab_size: int, split: _Split) -> None:
    text, whole = _decode(key, file)
    if text.lstrip().startswith("[") and whole:  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(key, str(file), f" line {e.lineno}", f"not valid JSON ({e.msg})")
        items = [(f" record {i + 1}", r) for i, r in enumerate(rows)]
    else:
        items = []
        full = whole and len(text) <= FULL_SCAN_BYTES
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if not full and len(items) >= SAMPLE_RECORDS:
                split.complete = False
                break
            try:
                items.append((f" line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                _fail(key, str(file), f" line {lineno}", f"not valid JSON ({e.msg} at column {e.colno}); every "
                      "line of a .jsonl file must be one JSON object")
        if not whole:
            split.complete = False
    for where, row in items:
        split.tokens += _check_record(cfg, key, str(file), where, row, tokenizer, vocab_size)
        split.records += 1


def _check_text_file(cfg: Config, key: str, file: Path, tokenizer, split: _Split) -> None:
    if cfg.data.token_field:
        _fail(key, str(file), "", f"plain text has no field {cfg.data.token_field!r} (data.token_field): "
              "pre-tokenised ids need .jsonl or .parquet files, or unset data.token_field")
    text, whole = _decode(key, file)
    lines = text.splitlines()
    if not whole or len(lines) > SAMPLE_RECORDS * 64:
        split.complete = False
        lines = lines[:SAMPLE_RECORDS]
    for line in lines:
        split.tokens += len(tokenizer.encode(line)) + 1
        split.records += 1


def _check_parquet_file(cfg: Config, key: str, file: Path, tokenizer, vocab_size: int, split: _Split) -> None:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow's errors: not a parquet file, truncated footer
        _fail(key, str(file), "", f"not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0]}); "
              "check the file or data.format")
    field = cfg.data.token_field or cfg.data.text_field
    names = pf.schema_arrow.names
    if field not in names:
        which = "token_field" if cfg.data.token_field else "text_field"
        _fail(key, str(file), "", f"no column {field!r} (data.{which}); columns: {names}: set data.{which}")
    seen = 0
    for batch in pf.iter_batches(batch_size=SAMPLE_RECORDS, columns=[field]):
        for i, value in enumerate(batch.column(0).to_pylist()):
            split.tokens += _check_record(cfg, key, str(file), f" row {seen + i + 1}", {field: value}, tokenizer,
                                          vocab_size)
            split.records += 1
        seen += batch.num_rows
        break
    if seen < pf.metadata.num_rows:
        split.complete = False


def _check_split(cfg: Config, key: str, path: str, tokenizer, vocab_size: int) -> _Split:
    fmt, files = resolve_files(path, cfg.data.format, key)
    split = _Split()
    for name in files:
        file = Path(name)
        try:
            if fmt == "json":
                _check_json_file(cfg, key, file, tokenizer, vocab_size, split)
            elif fmt == "text":
                _check_text_file(cfg, key, file, tokenizer, split)
            else:
                _check_parquet_file(cfg, key, file, tokenizer, vocab_size, split)
        except OSError as e:
            _fail(key, str(file), "", f"cannot be read ({e.strerror or e})")
    seq = cfg.train.seq_len
    where = files[0] if len(files) == 1 else f"{path!r} ({len(files)} files)"
    if split.records == 0 and split.complete:
        _fail(key, where, "", "no records (empty file?): give a file with data")
    if split.complete and split.tokens < seq + 1:
        _fail(key, where, "", f"the corpus holds {split.tokens} tokens, shorter than one sequence of "
              f"train.seq_len + 1 = {seq + 1}: add data or lower train.seq_len")
    return split


def preflight_data(cfg: Config, vocab_size: int, tokenizer=None) -> None:
    """Checks data.path / data.val_path against the model's ``vocab_size`` (see the module docstring); synthetic
    data needs nothing. ValueError naming the key, the file and the fix."""
    d, t = cfg.data, cfg.train
    if d.kind != "files":
        return
    resolve_files(d.path, d.format, "data.path")  # a wrong path first: it is the likeliest mistake
    if d.val_path:
        resolve_files(d.val_path, d.format, "data.val_path")
    if tokenizer is None and not d.token_field:
        tokenizer = build_tokenizer(d.tokenizer)
    if tokenizer is not None and not d.token_field and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"data.tokenizer={d.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{vocab_size}: use a model with a vocabulary at least that large or another tokenizer")
    train = _check_split(cfg, "data.path", d.path, tokenizer, vocab_size)
    if d.val_path:
        _check_split(cfg, "data.val_path", d.val_path, tokenizer, vocab_size)
    elif d.val_sequences and train.complete:
        packed = max(0, (train.tokens - 1) // t.seq_len)
        if packed <= d.val_sequences:
            raise ValueError(f"data.val_sequences={d.val_sequences} is not allowed: data.path={d.path!r} packs into "
                             f"about {packed} sequences of train.seq_len={t.seq_len}, and the held-out ones come "
                             f"from its end: lower data.val_sequences or give data.val_path")

