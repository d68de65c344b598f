"""Text <-> token ids for evaluation, and lm-evaluation-harness's context / continuation split.

Tokenisers (``build_codec``): ``ids`` -- text is space-separated token ids, e.g. "0 18 19 20" (the generated corpus
and the tiny models use it: their vocabulary is 64 ids with no text form; BOS = 0); ``byte`` -- the data
pipeline's UTF-8 byte tokenizer; or a local Hugging Face tokenizer folder.
Context/continuation split (lm-eval's): whole = encode(context + continuation), the context part = encode(context),
the continuation = whole[len(context part):]; trailing spaces of the context move to the continuation.
"""

from __future__ import annotations

from typing import Sequence

from moe_train.data import build_tokenizer


class TokenIdCodec:
    """Text = space-separated integer token ids ("0 18 19"); BOS (= the prefix token) is 0, as in the corpus."""

    def __init__(self, vocab_size: int, bos_id: int = 0):
        self.vocab_size, self.bos_id = vocab_size, bos_id

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in text.split():
            if not tok.isdigit() or int(tok) >= self.vocab_size:
                raise ValueError(f"token {tok!r} in {text[:60]!r}: the 'ids' tokenizer reads space-separated integer "
                                 f"token ids in [0, {self.vocab_size})")
            ids.append(int(tok))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_codec(spec: str, vocab_size: int):
    """``ids`` | ``byte`` | a local Hugging Face tokenizer folder; checked against the model's vocabulary."""
    if spec == "ids":
        return TokenIdCodec(vocab_size)
    tok = build_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
                         "; use --tokenizer ids for the tiny synthetic-corpus models")
    return tok


def prefix_id(codec) -> int:
    """The token that starts a text with no context (BOS if the tokenizer has one, else EOS)."""
    bos = getattr(codec, "bos_id", None)
    return bos if bos is not None else codec.eos_id


def encode_pair(codec, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces go to the continuation; an empty context becomes [prefix]."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    if not context:
        return [prefix_id(codec)], codec.encode(continuation)
    whole = codec.encode(context + continuation)
    ctx = codec.encode(context)
    return ctx, whole[len(ctx):]
