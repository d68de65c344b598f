"""The generated corpora (config.CORPORA, selected by data.corpus): how each is generated and what its labels mean.

    mixed       moe_train/data/generated.py   filler / copy / arithmetic / brackets (the original corpus)
    difficulty  moe_train/data/difficulty.py  recall at several table sizes, computation, trivial, unpredictable,
                                              copy: difficulty as "what would help predict this token"
A Corpus carries its generator, its label names and the label groups the validation report averages over
(moe_train/eval/report.py: ``mean_k_<group>`` and ``loss_<group>``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moe_train.config import CORPORA
from moe_train.data import difficulty, generated


@dataclass(frozen=True)
class Corpus:
    name: str
    generate: Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]  # (B, S, vocab, seed) -> rows
    labels: dict  # label id -> name
    groups: dict  # group name -> label ids
    min_vocab: int


_CORPORA = {
    "mixed": Corpus("mixed", generated.generate, generated.LABELS,
                    {"hard": generated.HARD_LABELS, "easy": generated.EASY_LABELS}, generated.MIN_VOCAB),
    "difficulty": Corpus("difficulty", difficulty.generate, difficulty.LABELS, difficulty.GROUPS,
                         difficulty.MIN_VOCAB),
}
assert tuple(_CORPORA) == CORPORA, (tuple(_CORPORA), CORPORA)  # config.CORPORA is the one list of names


def get_corpus(name: str) -> Corpus:
    if name not in _CORPORA:
        raise ValueError(f"corpus {name!r} is not allowed: one of {CORPORA}")
    return _CORPORA[name]


def write_generated_corpus(out_dir: str | Path, num_sequences: int, val_sequences: int, seq_len: int,
                           vocab_size: int, seed: int, corpus: str = "mixed") -> Path:
    """Writes a generated corpus (data.corpus: ``mixed``, this module's, or ``difficulty``) as train.jsonl /
    val.jsonl, one sequence per line: {"tokens", "labels"}, and labels.json (label id -> name, and the corpus).

    Train it with data: {kind: files, corpus: <corpus>, path: <out>/train.jsonl, val_path: <out>/val.jsonl,
    token_field: tokens, label_field: labels} (the labels give validation's loss and true experts by difficulty).
    """
    spec = get_corpus(corpus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens, labels = spec.generate(num_sequences + val_sequences, seq_len, vocab_size, seed)
    for name, lo, hi in (("train", 0, num_sequences), ("val", num_sequences, num_sequences + val_sequences)):
        tmp = out / f".{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for i in range(lo, hi):
                f.write(json.dumps({"tokens": tokens[i].tolist(), "labels": labels[i].tolist()}) + "\n")
        os.replace(tmp, out / f"{name}.jsonl")
    (out / "labels.json").write_text(json.dumps({"corpus": corpus, **{str(k): v for k, v in spec.labels.items()}}))
    return out
