"""The difficulty corpus (moe_train/data/difficulty.py): determinism, what each label claims checked independently
on the generated tokens (trivial = previous + 1, copy = the source span, arith = the sum, bracket = the stack,
recall = the fixed tables, shared by every seed), the data.corpus selector, generate-data files, and the validation
report's per-label loss and experts per token against a plain per-token computation."""

import json

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ConfigError, apply_overrides, load_config
from moe_train.data import build_data, get_corpus
from moe_train.data import difficulty as D
from moe_train.eval.report import corpus_report, validation_metrics
from moe_train.model import build_model

V, S = 64, 96
W = V - D.FIRST_WORD


def _runs(labels: list[int], label: int) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of ``label``."""
    out, i = [], 0
    while i < len(labels):
        if labels[i] == label:
            j = i
            while j < len(labels) and labels[j] == label:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


@pytest.fixture(scope="module")
def corpus():
    return D.generate(48, S, V, seed=3)


def test_deterministic_and_seeded(corpus):
    t, lab = corpus
    t2, lab2 = D.generate(48, S, V, seed=3)
    assert torch.equal(t, t2) and torch.equal(lab, lab2)
    assert not torch.equal(t, D.generate(48, S, V, seed=4)[0])
    assert t.shape == lab.shape == (48, S + 1) and t.min() >= 0 and t.max() < V
    assert set(lab.unique().tolist()) == set(D.LABELS)  # every label occurs


def test_labels_mean_what_they_claim(corpus):
    tokens, labels = corpus
    checked = dict.fromkeys(["trivial", "copy", "arith", "bracket", "unpredictable"], 0)
    for toks, labs in zip(tokens.tolist(), labels.tolist()):
        for j, lab in enumerate(labs):
            if lab == D.TRIVIAL:  # fully determined by the previous token
                assert toks[j] == D.FIRST_WORD + (toks[j - 1] - D.FIRST_WORD + 1) % W
                checked["trivial"] += 1
            if lab == D.UNPRED:
                assert toks[j] >= D.FIRST_WORD
                checked["unpredictable"] += 1
        for a, b in _runs(labs, D.COPY):  # the span before SEP, repeated (possibly cut by the sequence end)
            assert toks[a - 1] == D.SEP
            src = _runs(labs[:a - 1], D.UNPRED)[-1]
            assert src[1] == a - 1 and toks[a:b] == toks[src[0]:src[0] + (b - a)]
            assert b - a == src[1] - src[0] or b == len(toks)
            checked["copy"] += 1
        for a, b in _runs(labs, D.ARITH):  # digits of a + b, then the separator
            if b == len(toks):
                continue
            eq = a - 1
            plus = max(i for i in range(eq) if toks[i] == D.PLUS)
            start = max(i for i in range(plus) if not D.DIGIT0 <= toks[i] < D.DIGIT0 + 10) + 1
            num = lambda ts: int("".join(str(x - D.DIGIT0) for x in ts))  # noqa: E731
            assert toks[eq] == D.EQ and toks[b - 1] == D.SEP
            assert num(toks[a:b - 1]) == num(toks[start:plus]) + num(toks[plus + 1:eq])
            checked["arith"] += 1
        for a, b in _runs(labs, D.BRACKET):  # closes in reverse order of the opens before them, then SEP
            n = b - a - 1
            if b == len(toks):
                continue
            opens = toks[a - n:a]
            assert toks[a:b - 1] == [D.CLOSE[o] for o in reversed(opens)] and toks[b - 1] == D.SEP
            checked["bracket"] += 1
    assert all(v > 5 for v in checked.values()), checked


def test_recall_values_come_from_fixed_tables_shared_by_every_seed():
    tables = D.recall_tables(W)
    assert [len(tb) for tb in tables] == list(D.TABLE_SIZES)
    lookup = [{(int(r[0]), int(r[1])): (int(r[2]), int(r[3])) for r in tb} for tb in tables]
    assert [len(x) for x in lookup] == list(D.TABLE_SIZES)  # distinct keys
    seen = 0
    for seed in (3, 11):  # train and held-out corpora: the same facts
        tokens, labels = D.generate(32, S, V, seed)
        for toks, labs in zip(tokens.tolist(), labels.tolist()):
            for i, lab in enumerate(D.RECALL):
                for a, b in _runs(labs, lab):
                    if b - a < 2:
                        continue  # a value cut by the sequence end
                    table = D.M_REC.index(next(toks[k] for k in range(a, -1, -1) if toks[k] in D.M_REC))
                    assert table == i
                    key = (toks[a - 2] - D.FIRST_WORD, toks[a - 1] - D.FIRST_WORD)
                    assert tuple(x - D.FIRST_WORD for x in toks[a:b]) == lookup[i][key]
                    seen += 1
    assert seen > 50


def test_selector_config_and_vocab():
    cfg = load_config("configs/tiny_top2.yaml", ["data.corpus=difficulty", "data.num_sequences=8",
                                                 "data.val_sequences=4", "train.seq_len=32"])
    data = build_data(cfg, V)
    ref_t, ref_l = D.generate(12, 32, V, cfg.data.seed)
    assert torch.equal(data.val_tokens, ref_t[8:]) and torch.equal(data.val_labels, ref_l[8:])
    with pytest.raises(ConfigError, match=r"data\.corpus"):
        apply_overrides(cfg, ["data.corpus=hard"])
    with pytest.raises(ValueError, match="vocab_size >= 48"):
        D.generate(2, 16, 40, 0)
    assert get_corpus("mixed").labels[3] == "arith"  # the original corpus stays the default
    assert load_config("configs/tiny_top2.yaml").data.corpus == "mixed"


def test_generate_data_files_and_per_label_report(tmp_path):
    from moe_train.cli import main

    assert main(["generate-data", "--out", str(tmp_path / "g"), "--num-sequences", "6", "--val-sequences", "4",
                 "--seq-len", "32", "--corpus", "difficulty", "--seed", "5"]) == 0
    names = json.loads((tmp_path / "g" / "labels.json").read_text())
    assert names["corpus"] == "difficulty" and names["5"] == "recall_16"
    cfg = load_config("configs/tiny_top2.yaml", [
        "data.kind=files", "data.corpus=difficulty", f"data.path={tmp_path / 'g' / 'train.jsonl'}",
        f"data.val_path={tmp_path / 'g' / 'val.jsonl'}", "data.token_field=tokens", "data.label_field=labels",
        "train.seq_len=32", "data.val_sequences=4", "model.hidden_size=16", "model.intermediate_size=16"])
    data = build_data(cfg, V)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    corpus = get_corpus("difficulty")
    rep = corpus_report(model, data.val_batches(2), label_names=corpus.labels, label_groups=corpus.groups)
    # an independent per-token computation: loss and true experts per token of each label, float64
    with torch.no_grad():
        logits, plans = model(data.val_tokens[:, :-1], return_plans=True)
    nll = F.cross_entropy(logits.reshape(-1, V).double(), data.val_tokens[:, 1:].reshape(-1), reduction="none")
    k = torch.stack([p.true_mask_TK.sum(-1) for p in plans]).double().mean(0)
    lab = data.val_labels[:, 1:].reshape(-1)
    for g, name in corpus.labels.items():
        sel = lab == g
        if sel.any():
            assert rep["by_label"][name]["loss"] == pytest.approx(float(nll[sel].mean()), rel=1e-5)
            assert rep["by_label"][name]["mean_k"] == pytest.approx(float(k[sel].mean()))
    sel = (lab == 5) | (lab == 6) | (lab == 7)
    assert rep["loss_recall"] == pytest.approx(float(nll[sel].mean()), rel=1e-5)
    val = validation_metrics(rep)
    assert set(val["val_loss_by_label"]) == set(val["val_true_experts_by_label"]) == set(val["val_label_tokens"])
    assert sum(val["val_label_tokens"].values()) == rep["tokens"]
