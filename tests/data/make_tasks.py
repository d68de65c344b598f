"""Writes the small local evaluation tasks in this folder from the generated corpus (moe_train/data/generated.py).

    python tests/data/make_tasks.py      # deterministic: rewrites synthetic_mc.jsonl and synthetic_ppl.jsonl

Text is space-separated token ids (the ``ids`` tokenizer of moe_train/eval/codec.py). The corpus seed (777)
differs from every training config's data.seed, so these sequences are held out.
synthetic_mc.jsonl   multiple choice: the context is a corpus prefix, the choices are the true next token and 3
                     distractors of the same kind (digits for digits, brackets for brackets, words for words);
                     "label" is the difficulty label of the true token (LABELS).
synthetic_ppl.jsonl  perplexity: whole corpus sequences {"text"}.
"""

import json
import random
from pathlib import Path

from moe_train.data.generated import DIGIT0, FIRST_WORD, LABELS, generate

HERE = Path(__file__).parent
VOCAB, SEQ = 64, 96


def kind_pool(tok: int) -> list[int]:
    if DIGIT0 <= tok < DIGIT0 + 10:
        return list(range(DIGIT0, DIGIT0 + 10))
    if tok >= FIRST_WORD:
        return list(range(FIRST_WORD, VOCAB))
    return [1, 12, 13, 14, 15, 16, 17]  # separators, operators and brackets


def main() -> None:
    rng = random.Random(0)
    tokens, labels = generate(48, SEQ, VOCAB, seed=777)
    mc = []
    for i in range(tokens.shape[0]):
        row, lab = tokens[i].tolist(), labels[i].tolist()
        for want in (0, 2, 3, 4):  # filler, copy, arith, bracket targets: one of each per sequence when present
            pos = [j for j in range(8, len(row)) if lab[j] == want]
            if not pos:
                continue
            j = rng.choice(pos)
            true = row[j]
            distract = rng.sample([t for t in kind_pool(true) if t != true], 3)
            choices = [true] + distract
            rng.shuffle(choices)
            mc.append({"context": " ".join(map(str, row[:j])), "choices": [str(c) for c in choices],
                       "gold": choices.index(true), "label": LABELS[want]})
    rng.shuffle(mc)
    mc = mc[:96]
    (HERE / "synthetic_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    ppl = [{"text": " ".join(map(str, tokens[i].tolist()))} for i in range(8)]
    (HERE / "synthetic_ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ppl))
    print(f"wrote {len(mc)} multiple-choice and {len(ppl)} perplexity documents to {HERE}")


if __name__ == "__main__":
    main()
