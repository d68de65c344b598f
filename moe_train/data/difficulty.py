"""The difficulty corpus: target tokens whose difficulty differs in WHAT would help predict them (issue 15).

Each sequence is BOS followed by segments, each opened by a marker token naming its kind:
  trivial        M_TRIV w w+1 w+2 ...          every token after the first is fully determined by the previous one
  unpredictable  M_RAND r r r ...              uniform random words: nothing can predict them (entropy ln W)
  copy           M_COPY s1..sn SEP s1..sn      the repeat is predictable only by attending back (attention's job)
  arith          a + b = c ;                   a, b random 1-3 digit numbers; the digits of c need the sum
  bracket        ( [ ( ... ) ] ) ;             random opens, then every one closed in reverse order (a stack)
  recall (x3)    M_REC_i k1 k2 v1 v2 ...       pairs drawn from a FIXED key -> value table i (two-word keys, two-word
                                               values), one table per size in TABLE_SIZES; the values are a function
                                               of the key that only memorised parameters hold (the classic FFN
                                               capacity probe). The tables depend on TABLE_SEED only, never on the
                                               corpus seed: train, validation and `moe-train eval` share them.
Every target token is labelled (LABELS) with what predicting it takes. Tokens whose prediction is none of the
above (markers, operands, keys, the first word of a run, separators) are ``structure``.
The corpus is a pure function of (num_sequences, seq_len, vocab_size, seed); segment kinds are drawn uniformly,
a recall segment's table uniformly among the sizes.
Shape legend (docs/shapes.md): B sequences, S sequence length (rows hold S + 1 tokens).
"""

from __future__ import annotations

import numpy as np
import torch

BOS, SEP, PLUS, EQ = 0, 1, 12, 13
DIGIT0 = 2  # tokens 2..11 are the digits 0..9
OPEN = (14, 16)
CLOSE = {14: 15, 16: 17}
M_TRIV, M_RAND, M_COPY = 18, 19, 20
M_REC = (21, 22, 23)  # one marker per recall table
FIRST_WORD = 24
TABLE_SIZES = (16, 96, 512)  # keys per recall table: seen ~hundreds of times each (small) to ~tens (large)
TABLE_SEED = 15
PAIRS_PER_RECALL = 3
MIN_WORDS = 24  # two-word keys: W^2 >= max(TABLE_SIZES) distinct keys
MIN_VOCAB = FIRST_WORD + MIN_WORDS

LABELS = {0: "trivial", 1: "unpredictable", 2: "copy", 3: "arith", 4: "bracket", 5: "recall_16", 6: "recall_96",
          7: "recall_512", 8: "structure"}
TRIVIAL, UNPRED, COPY, ARITH, BRACKET, STRUCT = 0, 1, 2, 3, 4, 8
RECALL = (5, 6, 7)  # the labels of the tables of TABLE_SIZES, in order
# Groups the validation report averages experts per token over (moe_train/eval/report.py)
GROUPS = {"recall": RECALL, "computation": (ARITH, BRACKET), "trivial": (TRIVIAL,), "unpredictable": (UNPRED,),
          "copy": (COPY,)}
assert len(M_REC) == len(TABLE_SIZES) == len(RECALL)


def recall_tables(num_words: int) -> list[np.ndarray]:
    """Table i: [TABLE_SIZES[i], 4] int64 rows (key word 1, key word 2, value word 1, value word 2), word indices
    in [0, num_words); distinct keys within a table. A function of num_words and TABLE_SEED only."""
    rng = np.random.default_rng(TABLE_SEED)
    tables = []
    for size in TABLE_SIZES:
        keys = rng.choice(num_words * num_words, size=size, replace=False)
        values = rng.integers(num_words, size=(size, 2))
        tables.append(np.stack([keys // num_words, keys % num_words, values[:, 0], values[:, 1]], axis=1))
    return tables


def _number(rng: np.random.Generator) -> int:
    return int(rng.integers(10 ** int(rng.integers(1, 4))))  # 1-3 digits


def _segment(rng: np.random.Generator, num_words: int, tables: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one segment; labels[j] describes predicting tokens[j]."""
    W = FIRST_WORD
    kind = int(rng.integers(6))
    if kind == 0:  # trivial
        start, n = int(rng.integers(num_words)), int(rng.integers(4, 12))
        return [M_TRIV] + [W + (start + i) % num_words for i in range(n)], [STRUCT, STRUCT] + [TRIVIAL] * (n - 1)
    if kind == 1:  # unpredictable
        n = int(rng.integers(4, 12))
        return [M_RAND] + [W + int(w) for w in rng.integers(num_words, size=n)], [STRUCT] + [UNPRED] * n
    if kind == 2:  # copy: the source span is uniform random words
        span = [W + int(w) for w in rng.integers(num_words, size=int(rng.integers(3, 8)))]
        return [M_COPY] + span + [SEP] + span, [STRUCT] + [UNPRED] * len(span) + [STRUCT] + [COPY] * len(span)
    if kind == 3:  # arith
        a, b = _number(rng), _number(rng)
        da, db, dc = ([DIGIT0 + int(c) for c in str(v)] for v in (a, b, a + b))
        toks = da + [PLUS] + db + [EQ] + dc + [SEP]
        return toks, [STRUCT] * (len(da) + 1 + len(db) + 1) + [ARITH] * (len(dc) + 1)
    if kind == 4:  # bracket
        opens = [OPEN[int(rng.integers(2))] for _ in range(int(rng.integers(2, 7)))]
        return opens + [CLOSE[o] for o in reversed(opens)] + [SEP], [STRUCT] * len(opens) + [BRACKET] * (len(opens) + 1)
    t = int(rng.integers(len(tables)))  # recall
    toks, labs = [M_REC[t]], [STRUCT]
    for row in tables[t][rng.integers(len(tables[t]), size=PAIRS_PER_RECALL)]:
        toks += [W + int(v) for v in row]
        labs += [STRUCT, STRUCT, RECALL[t], RECALL[t]]
    return toks, labs


def generate(num_sequences: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens_B(S+1), labels_B(S+1)) int64; labels[i, j] is the difficulty of predicting tokens[i, j]."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"the difficulty corpus needs model.vocab_size >= {MIN_VOCAB} (two-word keys for recall "
                         f"tables of up to {max(TABLE_SIZES)} entries), got {vocab_size}")
    num_words = vocab_size - FIRST_WORD
    tables = recall_tables(num_words)
    rng = np.random.default_rng(seed)
    tokens = np.empty((num_sequences, seq_len + 1), dtype=np.int64)
    labels = np.empty_like(tokens)
    for i in range(num_sequences):
        toks, labs = [BOS], [STRUCT]
        while len(toks) < seq_len + 1:
            t, lab = _segment(rng, num_words, tables)
            toks += t
            labs += lab
        tokens[i], labels[i] = toks[: seq_len + 1], labs[: seq_len + 1]
    return torch.from_numpy(tokens), torch.from_numpy(labels)
