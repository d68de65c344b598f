"""A generated corpus whose tokens differ in difficulty, labelled per token.

Sequences are concatenations of segments:
  filler   a run of consecutive word ids (w, w+1, w+2, ...): after its first token every next token is trivial
  copy     a random span, a separator, the same span again: the repeat is predictable only by attending back
  arith    a + b = c in decimal digits: a and b are random, the digits of c need the sum
  bracket  random opening brackets, then every one closed in reverse order: the closes need a stack
Each target token carries a difficulty label (LABELS) describing how hard it is to predict from its prefix, so
evaluation can relate the experts a token uses to its difficulty. Nothing is downloaded; the corpus is a pure
function of (num_sequences, seq_len, vocab_size, seed). ``corpora.write_generated_corpus`` stores it as jsonl files for the
file-backed pipeline (``moe-train generate-data``).
Shape legend (docs/shapes.md): B sequences, S sequence length (inputs; the stored rows have S + 1 tokens).
"""

from __future__ import annotations

import numpy as np
import torch

BOS, SEP, PLUS, EQ = 0, 1, 12, 13
DIGIT0 = 2  # tokens 2..11 are the digits 0..9
OPEN = (14, 16)  # '(' '['
CLOSE = {14: 15, 16: 17}  # ')' ']'
FIRST_WORD = 18
MIN_VOCAB = FIRST_WORD + 8

LABELS = {0: "filler", 1: "random", 2: "copy", 3: "arith", 4: "bracket", 5: "structure"}
EASY_LABELS = (0, 5)
HARD_LABELS = (2, 3, 4)


def _segment(rng: np.random.Generator, num_words: int) -> tuple[list[int], list[int]]:
    kind = rng.integers(4)
    word = lambda: FIRST_WORD + int(rng.integers(num_words))  # noqa: E731
    if kind == 0:  # filler
        start, n = int(rng.integers(num_words)), int(rng.integers(6, 14))
        toks = [FIRST_WORD + (start + i) % num_words for i in range(n)]
        return toks, [1] + [0] * (n - 1)
    if kind == 1:  # copy
        span = [word() for _ in range(int(rng.integers(3, 8)))]
        return span + [SEP] + span, [1] * len(span) + [5] + [2] * len(span)
    if kind == 2:  # arith
        a, b = int(rng.integers(100)), int(rng.integers(100))
        da, db, dc = ([DIGIT0 + int(c) for c in str(v)] for v in (a, b, a + b))
        toks = da + [PLUS] + db + [EQ] + dc + [SEP]
        return toks, [1] * len(da) + [1] + [1] * len(db) + [5] + [3] * len(dc) + [3]
    opens = [OPEN[int(rng.integers(2))] for _ in range(int(rng.integers(2, 6)))]  # bracket
    return opens + [CLOSE[o] for o in reversed(opens)] + [SEP], [1] * len(opens) + [4] * (len(opens) + 1)


def generate(num_sequences: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens_B(S+1), labels_B(S+1)) int64; labels[i, j] is the difficulty of predicting tokens[i, j]."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"the synthetic corpus needs model.vocab_size >= {MIN_VOCAB}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    num_words = vocab_size - FIRST_WORD
    tokens = np.empty((num_sequences, seq_len + 1), dtype=np.int64)
    labels = np.empty_like(tokens)
    for i in range(num_sequences):
        toks, labs = [BOS], [1]
        while len(toks) < seq_len + 1:
            t, lab = _segment(rng, num_words)
            toks += t
            labs += lab
        tokens[i], labels[i] = toks[: seq_len + 1], labs[: seq_len + 1]
    return torch.from_numpy(tokens), torch.from_numpy(labels)
