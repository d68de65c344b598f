"""Packing documents into training sequences, the resumable data loader, and the assembly of a run's data.

    files (text / jsonl / parquet; a file, a folder or a glob)        moe_train/data/files.py
      -> documents -> token ids (+ EOS after each document)           byte-level tokenizer or a local HF tokenizer
      -> packed sequences of S+1 tokens with stride S                  every token is a target exactly once
      -> global batch of B sequences per step; rank r of n takes the r-th contiguous B/n of it
Map-style (default): all sequences packed in memory, shuffled per epoch with a seeded permutation. Streaming
(``data.streaming: true``): documents are read lazily in file order (no shuffle); every rank reads the stream and
keeps its share, and a resume skips the consumed sequences by re-reading them. The loader state is one number,
the count of global sequences consumed, so it is the same on every rank and after a change of world size.
Pre-tokenised data (``token_field``, e.g. the generated corpus written by ``moe-train generate-data``) skips the
tokenizer. Nothing is downloaded: tokenizers load from local folders only.
Shape legend (docs/shapes.md): B sequences per rank, S sequence length; n the number of source sequences.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from moe_train.config import Config, DataConfig
from moe_train.data.corpora import get_corpus
from moe_train.data.files import document_ids, resolve_files
from moe_train.data.tokenizers import build_tokenizer


def pack(docs: Iterator[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Sequences of seq_len + 1 tokens; consecutive sequences share one token, so each token is a target once."""
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1]
            buf = buf[seq_len:]


# ----------------------------------------------------------------------------------------------------------
# the loader

class DataLoader:
    """This rank's share of each global batch, in a deterministic order; state = global sequences consumed.

    Global sequence g of a map-style source is sequences[perm_e[g % n]] with e = g // n (epoch), perm_e a seeded
    permutation (identity when shuffle is off). A stream is read in order and restarted at its end; global indices
    keep counting across epochs.
    """

    def __init__(self, sequences: Optional[torch.Tensor], global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, stream_factory=None):
        assert (sequences is None) != (stream_factory is None)
        if global_batch % dp_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the data-parallel size {dp_size}")
        self.sequences, self.stream_factory = sequences, stream_factory
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed = 0
        self._stream: Optional[Iterator[list[int]]] = None
        self._stream_pos = 0  # global index of the next sequence the open stream yields

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BS, targets_BS) of this rank for the next global batch."""
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        rows = self._map_rows(start, per_rank) if self.sequences is not None else self._stream_rows(start, per_rank)
        self.consumed += self.global_batch
        return rows[:, :-1], rows[:, 1:]

    def _map_rows(self, start: int, count: int) -> torch.Tensor:
        n = self.sequences.shape[0]
        perms: dict[int, torch.Tensor] = {}
        idx = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, n)
            if self.shuffle and epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            idx.append(int(perms[epoch][pos]) if self.shuffle else pos)
        return self.sequences[torch.tensor(idx, dtype=torch.long)]

    def _stream_rows(self, start: int, count: int) -> torch.Tensor:
        """Reads the stream forward to global sequences [start, start + count), skipping other ranks' rows."""
        if self._stream is None or start < self._stream_pos:
            self._stream, self._stream_pos = iter(self.stream_factory()), 0
        rows: list[list[int]] = []
        read_this_epoch = 0
        while len(rows) < count:
            try:
                seq = next(self._stream)
            except StopIteration:
                if read_this_epoch == 0 and self._stream_pos == 0:
                    raise ValueError("data: the corpus is shorter than one sequence of train.seq_len + 1 tokens") from None
                self._stream, read_this_epoch = iter(self.stream_factory()), 0
                continue
            read_this_epoch += 1
            if self._stream_pos >= start:
                rows.append(seq)
            self._stream_pos += 1
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


# ----------------------------------------------------------------------------------------------------------
# assembly


class Data:
    """The training loader of this rank and the held-out split (the same on every rank)."""

    def __init__(self, train: DataLoader, val_tokens: Optional[torch.Tensor], val_labels: Optional[torch.Tensor]):
        self.train, self.val_tokens, self.val_labels = train, val_tokens, val_labels

    def val_batches(self, batch_size: int):
        """(inputs_BS, targets_BS, labels_BS or None) over the held-out sequences."""
        if self.val_tokens is None:
            return
        for i in range(0, self.val_tokens.shape[0], batch_size):
            seq = self.val_tokens[i:i + batch_size]
            labels = None if self.val_labels is None else self.val_labels[i:i + batch_size, 1:]
            yield seq[:, :-1], seq[:, 1:], labels


def _packed(cfg: DataConfig, path: str, tokenizer, seq_len: int, field_override: Optional[str] = None) -> torch.Tensor:
    rows = list(pack(document_ids(cfg, path, tokenizer, False, field_override), seq_len))
    if not rows:
        raise ValueError(f"data.path={path!r}: the corpus is shorter than one sequence of train.seq_len + 1 = "
                         f"{seq_len + 1} tokens (empty dataset?)")
    try:
        return torch.tensor(rows, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"data: {path!r} holds token ids that are not integers ({e}); "
                         f"token ids must be integers in [0, model.vocab_size)") from None


def _check_vocab(tokens: torch.Tensor, vocab_size: int, where: str) -> None:
    top = int(tokens.max()) if tokens.numel() else -1
    if top >= vocab_size or (tokens.numel() and int(tokens.min()) < 0):
        raise ValueError(f"{where}: token id {top} is outside the model's vocabulary (model.vocab_size="
                         f"{vocab_size}); the data was tokenised for another vocabulary")


def build_data(cfg: Config, vocab_size: int, dp_rank: int = 0, dp_size: int = 1) -> Data:
    """Everything about the data is checked here, before any model is built: paths, formats, emptiness, vocab."""
    d, t = cfg.data, cfg.train
    if d.kind == "synthetic":
        corpus = get_corpus(d.corpus)
        tokens, labels = corpus.generate(d.num_sequences + d.val_sequences, t.seq_len, vocab_size, d.seed)
        loader = DataLoader(tokens[: d.num_sequences], t.batch_size, dp_rank, dp_size, d.seed, shuffle=False)
        return Data(loader, tokens[d.num_sequences:] if d.val_sequences else None,
                    labels[d.num_sequences:] if d.val_sequences else None)

    resolve_files(d.path, d.format)  # fail now on a bad path, not in the middle of a stream
    tokenizer = None if d.token_field else build_tokenizer(d.tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(f"data.tokenizer={d.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{vocab_size}: use a model with a vocabulary at least that large or another tokenizer")
    val = val_labels = None
    if d.val_path:
        resolve_files(d.val_path, d.format, "data.val_path")
        val = _packed(d, d.val_path, tokenizer, t.seq_len)[: d.val_sequences or None]
        _check_vocab(val, vocab_size, f"data.val_path={d.val_path!r}")
        if d.label_field:  # packed exactly like the tokens, so label j belongs to token j
            val_labels = _packed(d, d.val_path, None, t.seq_len, d.label_field)[: d.val_sequences or None]
    if d.streaming:
        first = next(pack(document_ids(d, d.path, tokenizer, streaming=True), t.seq_len), None)
        if first is None:
            raise ValueError(f"data.path={d.path!r}: the corpus is shorter than one sequence of "
                             f"train.seq_len + 1 = {t.seq_len + 1} tokens (empty dataset?)")
        _check_vocab(torch.tensor(first), vocab_size, f"data.path={d.path!r}")
        factory = lambda: pack(document_ids(d, d.path, tokenizer, streaming=True), t.seq_len)  # noqa: E731
        return Data(DataLoader(None, t.batch_size, dp_rank, dp_size, d.seed, stream_factory=factory), val,
                    val_labels)
    seqs = _packed(d, d.path, tokenizer, t.seq_len)
    _check_vocab(seqs, vocab_size, f"data.path={d.path!r}")
    if val is None and d.val_sequences:
        if seqs.shape[0] <= d.val_sequences:
            raise ValueError(f"data.path={d.path!r} packs into {seqs.shape[0]} sequences, not more than "
                             f"data.val_sequences={d.val_sequences}: lower it or give data.val_path")
        seqs, val = seqs[: -d.val_sequences], seqs[-d.val_sequences:]
        if d.label_field:
            val_labels = _packed(d, d.path, None, t.seq_len, d.label_field)[-d.val_sequences:]
    return Data(DataLoader(seqs, t.batch_size, dp_rank, dp_size, d.seed, d.shuffle), val, val_labels)
