"""Data pipeline: formats, packing covers every token once, sharding over ranks, exact resume, streaming, errors."""

import json

import pytest
import torch

from moe_train.config import Config, DataConfig, TrainConfig
from moe_train.data import ByteTokenizer, DataLoader, build_data, pack, write_generated_corpus

SEQ = 16


def cfg_for(path, **data):
    data = {"val_sequences": 0, **data}
    return Config(train=TrainConfig(seq_len=SEQ, batch_size=4), data=DataConfig(kind="files", path=str(path), **data))


def corpus_docs(n=40):
    return [f"document {i}: " + "abcdefghij"[: 3 + i % 7] * (1 + i % 5) for i in range(n)]


def expected_stream(docs):
    tok = ByteTokenizer()
    flat = []
    for d in docs:
        flat += tok.encode(d) + [tok.eos_id]
    return flat


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def test_packing_covers_every_token_exactly_once_across_ranks(tmp_path):
    docs = corpus_docs()
    flat = expected_stream(docs)
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", docs), shuffle=False)
    n_seq = (len(flat) - 1) // SEQ
    for dp in (1, 2, 4):
        loaders = [build_data(cfg, 258, r, dp).train for r in range(dp)]
        targets = []
        for _ in range(n_seq // 4):
            for loader in loaders:
                _, y = loader.next_batch()
                targets += y.reshape(-1).tolist()
        # in order and exactly once: the targets are the token stream shifted by one, up to the last full batch
        assert targets == flat[1:1 + len(targets)], dp
        assert len(targets) == (n_seq // 4) * 4 * SEQ


def test_shuffled_epoch_is_a_permutation_and_ranks_partition_the_batch(tmp_path):
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", corpus_docs()))
    single = build_data(cfg, 258).train
    n = single.sequences.shape[0]
    seen = [single.next_batch()[0] for _ in range(n // 4)]
    rows = torch.cat(seen)
    from collections import Counter

    # within an epoch every sequence is drawn at most once (as a multiset: the text repeats itself)
    assert not Counter(tuple(r.tolist()) for r in rows) - Counter(tuple(r.tolist()) for r in single.sequences[:, :-1])
    assert not torch.equal(rows, single.sequences[: len(rows), :-1])  # and it was shuffled
    pair = [build_data(cfg, 258, r, 2).train for r in range(2)]
    x0, x1 = pair[0].next_batch()[0], pair[1].next_batch()[0]
    assert torch.equal(torch.cat([x0, x1]), seen[0])


def test_resume_from_state_is_exact(tmp_path):
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", corpus_docs()))
    a = build_data(cfg, 258).train
    for _ in range(7):  # crosses an epoch boundary
        a.next_batch()
    b = build_data(cfg, 258).train
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(5):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_streaming_matches_map_style_order_and_resumes(tmp_path):
    docs = corpus_docs()
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    mapped = build_data(cfg_for(path, shuffle=False), 258).train
    stream = build_data(cfg_for(path, streaming=True), 258).train
    n = mapped.sequences.shape[0]
    for _ in range(n // 4 + 3):  # past the end of the stream: it restarts like the next epoch
        assert torch.equal(mapped.next_batch()[0], stream.next_batch()[0])
    resumed = build_data(cfg_for(path, streaming=True), 258, 1, 2).train
    resumed.load_state_dict(stream.state_dict())
    mapped_rank1 = DataLoader(mapped.sequences, 4, 1, 2, shuffle=False)
    mapped_rank1.load_state_dict(stream.state_dict())
    assert torch.equal(resumed.next_batch()[0], mapped_rank1.next_batch()[0])


def test_text_parquet_folder_and_glob(tmp_path):
    docs = corpus_docs(20)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("\n".join(docs[:10]) + "\n")
    (tmp_path / "t" / "b.txt").write_text("\n".join(docs[10:]) + "\n")
    text = build_data(cfg_for(tmp_path / "t", shuffle=False), 258).train
    globbed = build_data(cfg_for(str(tmp_path / "t" / "*.txt"), shuffle=False), 258).train
    assert torch.equal(text.sequences, globbed.sequences)
    assert text.sequences[0].tolist() == expected_stream(docs)[: SEQ + 1]  # one document per text line
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    par = build_data(cfg_for(tmp_path / "c.parquet", shuffle=False), 258).train
    flat = expected_stream(docs)
    assert par.sequences[0].tolist() == flat[: SEQ + 1]


def test_local_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path / "tk")
    path = write_jsonl(tmp_path / "c.jsonl", ["a b a b c " * 10] * 5)
    loader = build_data(cfg_for(path, tokenizer=str(tmp_path / "tk"), shuffle=False), 8).train
    assert loader.sequences[0, :6].tolist() == [2, 3, 2, 3, 0, 2]
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        build_data(cfg_for(path, tokenizer=str(tmp_path / "missing")), 8)


def test_generated_corpus_files_train_like_the_in_memory_corpus(tmp_path):
    write_generated_corpus(tmp_path / "g", 20, 4, SEQ, 64, seed=5)
    cfg = cfg_for(tmp_path / "g" / "train.jsonl", token_field="tokens", val_path=str(tmp_path / "g" / "val.jsonl"),
                  val_sequences=4)
    data = build_data(cfg, 64)
    first = json.loads((tmp_path / "g" / "train.jsonl").read_text().splitlines()[0])
    assert len(first["tokens"]) == len(first["labels"]) == SEQ + 1
    assert data.val_tokens.shape == (4, SEQ + 1)
    assert data.train.sequences.max() < 64


@pytest.mark.parametrize("make, needle", [
    (lambda p: cfg_for(p / "nope.jsonl"), "does not exist"),
    (lambda p: cfg_for(write_jsonl(p / "e.jsonl", ["x"])), "shorter than one sequence"),
    (lambda p: cfg_for(write_jsonl(p / "c.jsonl", corpus_docs()), text_field="body"), "no column 'body'"),
    (lambda p: cfg_for(p), "matches no data files"),
])
def test_bad_data_fails_clearly(tmp_path, make, needle):
    with pytest.raises(ValueError, match=needle):
        build_data(make(tmp_path), 258)


def test_tokenizer_vocab_mismatch(tmp_path):
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", corpus_docs()))
    with pytest.raises(ValueError, match="model.vocab_size=64"):
        build_data(cfg, 64)
    write_generated_corpus(tmp_path / "g", 8, 0, SEQ, 128, seed=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        build_data(cfg_for(tmp_path / "g" / "train.jsonl", token_field="tokens"), 64)


def test_pack_stride():
    seqs = list(pack(iter([[1, 2, 3], [4, 5, 6, 7]]), 3))
    assert seqs == [[1, 2, 3, 4], [4, 5, 6, 7]]


def test_generate_data_command_then_train_on_the_files(tmp_path):
    from moe_train.cli import main

    assert main(["generate-data", "--out", str(tmp_path / "g"), "--num-sequences", "40", "--val-sequences", "4",
                 "--seq-len", str(SEQ)]) == 0
    labels = json.loads((tmp_path / "g" / "labels.json").read_text())
    assert "arith" in labels.values()
    out = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny_top2.yaml", "--set", "train.steps=2", "--set",
                 f"train.seq_len={SEQ}", "--set", "train.batch_size=4", "--set", f"train.out_dir={out}",
                 "--set", "data.kind=files", "--set", f"data.path={tmp_path / 'g' / 'train.jsonl'}",
                 "--set", f"data.val_path={tmp_path / 'g' / 'val.jsonl'}", "--set", "data.token_field=tokens",
                 "--set", "data.label_field=labels", "--set", "data.val_sequences=4",
                 "--set", "train.tensorboard=false"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" not in r] == [1, 2]
    assert "arith" in rows[-1]["val_true_experts_by_label"]  # labels travelled with the files


def test_labels_pack_like_tokens(tmp_path):
    from moe_train.data import generate, write_generated_corpus

    write_generated_corpus(tmp_path / "g", 6, 3, SEQ, 64, seed=9)
    cfg = cfg_for(tmp_path / "g" / "train.jsonl", token_field="tokens", label_field="labels",
                  val_path=str(tmp_path / "g" / "val.jsonl"), val_sequences=3)
    data = build_data(cfg, 64)
    tokens, labels = generate(9, SEQ, 64, seed=9)  # the same corpus, generated independently
    # the val file holds sequences 6..8 back to back; packing with stride SEQ shifts by one token per sequence
    flat_t, flat_l = tokens[6:].reshape(-1), labels[6:].reshape(-1)
    for i in range(data.val_tokens.shape[0]):
        assert torch.equal(data.val_tokens[i], flat_t[i * SEQ: i * SEQ + SEQ + 1])
        assert torch.equal(data.val_labels[i], flat_l[i * SEQ: i * SEQ + SEQ + 1])
