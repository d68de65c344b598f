"""Tokenizers of the data pipeline: UTF-8 bytes, or a Hugging Face tokenizer from a local folder (never downloads)."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes 0..255, BOS = 256, EOS = 257: needs model.vocab_size >= 258."""

    vocab_size = 258
    bos_id, eos_id = 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer from a local folder (tokenizer.json or transformers files); never downloads."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # optional dependency: only for text data with an HF tokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"data.tokenizer={path!r}: cannot load a tokenizer from this local folder "
                             f"({type(e).__name__}: {e}); use 'byte' or a folder with tokenizer.json") from e
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"data.tokenizer={path!r} has no EOS token to separate packed documents")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def build_tokenizer(spec: str):
    """``byte`` or a local Hugging Face tokenizer folder."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
