"""The data package: local files through `datasets`, tokenizers, packing into resumable batches, and the
generated difficulty-labelled corpus.

    files.py       a file / folder / glob of text, jsonl or parquet -> token ids per document
    tokenizers.py  UTF-8 bytes or a local Hugging Face tokenizer
    packing.py     documents -> packed sequences -> this rank's share of each global batch (resumable); build_data
    generated.py   the synthetic corpus whose tokens differ in difficulty, with per-token LABELS
    difficulty.py  the difficulty corpus (recall / computation / trivial / unpredictable / copy labels)
    corpora.py     data.corpus: the generated corpora, their labels and label groups
"""

from moe_train.data.corpora import Corpus, get_corpus, write_generated_corpus
from moe_train.data.files import FORMATS, document_ids, resolve_files
from moe_train.data.generated import EASY_LABELS, HARD_LABELS, LABELS, MIN_VOCAB, generate
from moe_train.data.packing import Data, DataLoader, build_data, pack
from moe_train.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["FORMATS", "document_ids", "resolve_files", "EASY_LABELS", "HARD_LABELS", "LABELS", "MIN_VOCAB",
           "generate", "write_generated_corpus", "Data", "DataLoader", "build_data", "pack", "ByteTokenizer",
           "HFTokenizer", "build_tokenizer", "Corpus", "get_corpus"]
