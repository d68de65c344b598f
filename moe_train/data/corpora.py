"""The generated corpora (config.CORPORA, selected by data.corpus): how each is generated and what its labels mean.

    mixed       moe_train/data/generated.py   filler / copy / arithmetic / brackets (the original corpus)
    difficulty  moe_train/data/difficulty.py  recall at several table sizes, computation, trivial, unpredictable,
                                              copy: difficulty as "what would help predict this token"
A Corpus carries its generator, its label names and the label groups the validation report averages over
(moe_train/eval/report.py: ``mean_k_<group>`` and ``loss_<group>``).
"""

from __future__ import annotations

from dataclasses import dataclass
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
