"""Evaluation: multiple-choice and perplexity scoring against one-sequence float64 references, experts per token by
difficulty label against python loops, greedy generation against a teacher-forced check, the lm-eval adapter
against our evaluator on the same local task, and the `moe-train eval` CLI."""

import json
from pathlib import Path

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.data import LABELS, generate
from moe_train.eval.codec import TokenIdCodec, build_codec, encode_pair
from moe_train.eval.generate import greedy_generate
from moe_train.eval.report import corpus_report
from moe_train.eval.scoring import KStats, eval_routing, rolling_windows, score_continuations
from moe_train.eval.tasks import evaluate_multiple_choice, evaluate_perplexity, load_task
from moe_train.io.adak_convert import add_allocators
from moe_train.model import build_model

DATA = Path(__file__).parent / "data"
MC, PPL = DATA / "synthetic_mc.jsonl", DATA / "synthetic_ppl.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny Ada-K model (vocab 64, as the task files) with a random allocator: k varies from token to token."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2,
                                num_kv_heads=1, max_seq_len=128, init_std=0.1,
                                moe=MoEConfig(num_experts=4, top_k=2)))
    add_allocators(m, 1, 4)
    for layer in m.layers:
        torch.nn.init.normal_(layer.moe.router.allocator.weight, std=1.0)
    return m.eval()


def ref_logprobs(model, ids):
    """float64 log-probs of one unpadded sequence, greedy allocator; and its per-layer k per position."""
    with torch.no_grad(), eval_routing(model):
        logits, plans = model(torch.tensor([ids]), return_plans=True)
    return torch.log_softmax(logits[0].double(), -1), torch.stack([p.true_mask_TK.sum(-1) for p in plans])


def ref_continuation(model, ctx, cont):
    ids = (ctx + cont)[-(model.config.max_seq_len + 1):]
    lp, k = ref_logprobs(model, ids[:-1])
    n = len(ids) - 1
    ll = sum(lp[n - len(cont) + j, cont[j]].item() for j in range(len(cont)))
    greedy = all(lp[n - len(cont) + j].argmax().item() == cont[j] for j in range(len(cont)))
    return ll, greedy, k


def test_codec_and_pair_split():
    codec = TokenIdCodec(64)
    assert codec.encode(" 0 18  19\n") == [0, 18, 19] and codec.decode([0, 18]) == "0 18"
    for bad in ("0 x", "0 64", "-1"):
        with pytest.raises(ValueError, match="token"):
            codec.encode(bad)
    assert encode_pair(codec, "0 18 ", "19 20") == ([0, 18], [19, 20])  # trailing space moves over
    assert encode_pair(codec, "", " 7") == ([0], [7])  # empty context: the prefix token
    byte = build_codec("byte", 300)
    assert encode_pair(byte, "ab", " c") == ([97, 98], [32, 99])
    with pytest.raises(ValueError, match="vocab_size"):
        build_codec("byte", 64)


def test_multiple_choice_matches_single_sequence_reference(model):
    codec = TokenIdCodec(64)
    kind, docs = load_task(MC)
    assert kind == "multiple_choice"
    docs = docs[:24]
    rep = evaluate_multiple_choice(model, docs, codec, batch_size=5)
    correct, k_sum, positions = 0, torch.zeros(2, dtype=torch.float64), 0
    for d, pred in zip(docs, rep["predictions"]):
        lls = []
        for c in d["choices"]:
            ll, _, k = ref_continuation(model, codec.encode(d["context"]), codec.encode(c))
            lls.append(ll)
            k_sum += k.double().sum(1)
            positions += k.shape[1]
        assert pred == max(range(len(lls)), key=lambda i: (lls[i], -i))
        correct += pred == d["gold"]
    assert rep["acc"] == correct / len(docs)
    torch.testing.assert_close(torch.tensor(rep["mean_k_per_layer"], dtype=torch.float64), k_sum / positions)
    assert 1.0 < rep["mean_k"] < 4.0  # the random allocator uses several k


def test_scores_are_per_request_and_truncate_left(model):
    long_ctx = [int(t) for t in torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))]
    reqs = [([0, 18, 19], [20]), ([0, 5], [6, 7, 8]), (long_ctx, [3, 4])]
    got = score_continuations(model, reqs, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy, _ = ref_continuation(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_perplexity_matches_reference_with_rolling_windows(model):
    codec = TokenIdCodec(64)
    kind, docs = load_task(PPL)
    assert kind == "perplexity"
    docs = docs[:3]  # 97 tokens each, under max_seq_len=128: one window
    rep = evaluate_perplexity(model, docs, codec)
    nll, n = 0.0, 0
    for d in docs:
        ids = codec.encode(d["text"])
        lp, _ = ref_logprobs(model, [0] + ids[:-1])
        nll -= sum(lp[j, t].item() for j, t in enumerate(ids))
        n += len(ids)
    assert rep["tokens"] == n
    assert rep["nll_per_token"] == pytest.approx(nll / n, abs=1e-5)
    # texts longer than the model's window: lm-eval's windows (disjoint, every token scored once)
    lm_utils = pytest.importorskip("lm_eval.utils")
    for n_tok in (0, 1, 5, 128, 129, 300):
        ids = list(range(n_tok))
        ref = [tuple(map(list, lm_utils.make_disjoint_window(w)))
               for w in lm_utils.get_rolling_token_windows(ids, 63, 128, 1)]
        assert rolling_windows(ids, 63, 128) == ref


def test_mean_k_by_difficulty_label_matches_python_loops(model):
    tokens, labels = generate(6, 40, 64, 99)
    rep = corpus_report(model, [(tokens[:, :-1], tokens[:, 1:], labels[:, 1:])])
    with torch.no_grad(), eval_routing(model):
        logits, plans = model(tokens[:, :-1], return_plans=True)
    k = [p.true_mask_TK.sum(-1).tolist() for p in plans]
    lab = labels[:, 1:].reshape(-1).tolist()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 64).double(), tokens[:, 1:].reshape(-1),
                                            reduction="none").tolist()
    for g in set(lab):
        idx = [i for i, x in enumerate(lab) if x == g]
        entry = rep["by_label"][LABELS[g]]
        assert entry["tokens"] == len(idx)
        for layer in range(2):
            assert entry["mean_k_per_layer"][layer] == pytest.approx(sum(k[layer][i] for i in idx) / len(idx))
        assert entry["loss"] == pytest.approx(sum(nll[i] for i in idx) / len(idx), abs=1e-5)
    assert rep["val_loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    hard = [i for i, x in enumerate(lab) if x in (2, 3, 4)]
    assert rep["mean_k_hard"] == pytest.approx(sum(k[0][i] + k[1][i] for i in hard) / (2 * len(hard)))
    forced = corpus_report(model, [(tokens[:, :-1], tokens[:, 1:], None)], force_k=3)
    assert forced["mean_k_per_layer"] == [3.0, 3.0] and forced["expert_flops_vs_topk"] == 1.5
    with pytest.raises(ValueError, match="force_k"):
        corpus_report(model, [(tokens[:, :-1], tokens[:, 1:], None)], force_k=5)


def test_greedy_generation_is_argmax_teacher_forced(model):
    prompt = [0, 18, 19, 20]
    new, k_steps = greedy_generate(model, prompt, 12)
    assert len(new) == 12 and len(k_steps) == 12 and all(len(s) == 2 for s in k_steps)
    lp, k = ref_logprobs(model, prompt + new[:-1])
    for j, tok in enumerate(new):
        assert lp[len(prompt) - 1 + j].argmax().item() == tok
        assert k_steps[j] == k[:, len(prompt) - 1 + j].tolist()
    stop = new[3]
    first = new.index(stop)
    assert greedy_generate(model, prompt, 12, stop_ids=[stop])[0] == new[:first + 1]


def test_kstats_excludes_padding():
    class P:  # a plan stand-in: 3 positions with 1, 2, 3 true experts
        true_mask_TK = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    s = KStats(1)
    s.add([P()], torch.tensor([True, False, True]))
    assert s.summary()["mean_k"] == 2.0 and s.count == 2


# ----------------------------------------------------------------------------------------------------------
# lm-eval adapter


def test_lm_eval_adapter_agrees_with_our_evaluator(model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from moe_train.eval.lm_eval_adapter import MoETrainLM, write_task_yaml

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # leave ~/.cache alone
    _, docs = load_task(MC)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in docs[:40]))
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text("".join(line + "\n" for line in PPL.read_text().splitlines()[:3]))
    write_task_yaml("moe_train_mc", mc, tmp_path / "tasks")
    write_task_yaml("moe_train_ppl", ppl, tmp_path / "tasks")
    lm = MoETrainLM(model=model, tokenizer="ids", batch_size=8)
    res = lm_eval.simple_evaluate(model=lm, tasks=["moe_train_mc", "moe_train_ppl"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                           include_defaults=False), log_samples=False)
    codec = TokenIdCodec(64)
    ours = evaluate_multiple_choice(model, docs[:40], codec)
    assert res["results"]["moe_train_mc"]["acc,none"] == pytest.approx(ours["acc"])
    assert res["results"]["moe_train_mc"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    _, pdocs = load_task(ppl)
    ours_ppl = evaluate_perplexity(model, pdocs, codec)
    # the ids format has one word per token: lm-eval's word perplexity is our token perplexity
    assert res["results"]["moe_train_ppl"]["word_perplexity,none"] == pytest.approx(ours_ppl["perplexity"], rel=1e-6)
    assert 1.0 < lm.report()["mean_k"] < 4.0
    # generate_until: greedy tokens, cut at the first stop string
    new, _ = greedy_generate(model, [0, 18, 19], 6)
    stop = f" {new[2]}"
    out = lm.generate_until([Instance("generate_until", {}, ("0 18 19", {"until": [stop], "max_gen_toks": 6}), 0)])
    assert out[0] == (" " + codec.decode(new)).split(stop)[0]
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("5 6 7",), 0)])[0] == pytest.approx(
        score_continuations(model, [([0], [5, 6, 7])])[0][0])


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_cli_eval(model, tmp_path, capsys):
    from moe_train.cli import main
    from moe_train.io.model_file import save_model

    ckpt = save_model(model, tmp_path / "m.pt")
    out = tmp_path / "res.json"
    rc = main(["eval", "--checkpoint", str(ckpt), "--task", str(MC), "--difficulty", "--corpus-sequences", "4",
               "--corpus-seq-len", "32", "--generate", "0 18 19", "--max-new-tokens", "4", "--compare-topk",
               "--out", str(out), "--json"])  # --json: one JSON line per result on stdout (a table by default)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res[f"adak:{MC}"]["acc"] == evaluate_multiple_choice(model, load_task(MC)[1], TokenIdCodec(64))["acc"]
    assert res[f"top2:{MC}"]["mean_k"] == 2.0 and res["top2:difficulty"]["expert_flops_vs_topk"] == 1.0
    assert {"by_label", "mean_k_hard", "mean_k_easy", "flops_vs_topk"} <= res["adak:difficulty"].keys()
    assert len(res["adak:generate"]["completion"].split()) == 4
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["result"] for r in lines} == set(res) - {"checkpoint", "router"}
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert main(["eval", "--checkpoint", str(ckpt), "--task", str(bad)]) == 2
