"""The first training run end to end (CLI), its metrics, its checkpoint; FLOPs accounting; the generated corpus."""

import json
import math

import pytest
import torch

from moe_train.cli import main
from moe_train.config import ModelConfig, MoEConfig
from moe_train.data import HARD_LABELS, LABELS, generate
from moe_train.io.model_file import load_model, save_model
from moe_train.model.flops import expert_share, flops_vs_topk, forward_flops_per_token

FIELDS = {"step", "loss", "lm_loss", "aux_loss", "true_experts_per_token", "flops_vs_topk", "tokens_per_s"}


@pytest.mark.parametrize("config", ["configs/tiny_top2.yaml", "configs/tiny_adamoe.yaml"])
def test_cli_train_writes_metrics_and_checkpoint(tmp_path, config):
    out = tmp_path / "run"
    rc = main(["train", "--config", config, "--set", "train.steps=25", "--set", f"train.out_dir={out}",
               "--set", "data.num_sequences=256"])
    assert rc == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows, final = [r for r in lines if "val_loss" not in r], [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert len(final) == 1 and math.isfinite(final[0]["val_loss"])
    assert FIELDS <= set(rows[0])
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.5  # it learns
    assert all(math.isfinite(r["loss"]) for r in rows)
    model = load_model(out / "final" / "model.pt")
    ids = torch.randint(0, 64, (1, 16))
    assert model(ids).shape == (1, 16, 64)
    if "adamoe" in config:
        # null experts in use: fewer true experts than k=4, FLOPs reported against top-2
        assert all(r["true_experts_per_token"] < 4 for r in rows)
        assert rows[-1]["flops_vs_topk"] == pytest.approx(
            flops_vs_topk(model.config, rows[-1]["true_experts_per_layer"], 128))
    else:
        assert all(r["true_experts_per_token"] == 2 for r in rows)


def test_cli_bad_config_fails_before_work(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {moe: {top_k: 12}}\n")
    assert main(["train", "--config", str(cfg), "--set", f"train.out_dir={tmp_path / 'o'}"]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_checkpoint_is_atomic_and_corruption_is_detected(tmp_path):
    from moe_train.model import build_model

    model = build_model(ModelConfig())
    path = tmp_path / "m.pt"
    save_model(model, path, step=1)
    good = path.read_bytes()

    class Boom(Exception):
        pass

    import moe_train.io.model_file as ck

    real_save = ck.torch.save

    def crash(obj, f):
        f.write(b"partial")
        raise Boom()

    ck.torch.save = crash
    try:
        with pytest.raises(Boom):
            save_model(model, path, step=2)
    finally:
        ck.torch.save = real_save
    assert path.read_bytes() == good  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    (tmp_path / "bad.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupted or half-written"):
        load_model(tmp_path / "bad.pt")


def test_flops_mixtral_8x7b_expert_share_and_adamoe_reduction():
    mixtral = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, max_seq_len=4096, moe=MoEConfig(num_experts=8, top_k=2))
    share = expert_share(mixtral, seq_len=512)
    assert 0.86 < share < 0.89  # AdaMoE (arXiv 2406.13233, docs/references.md): ~0.876
    # hand count of one layer at 1 true expert: the expert part is 3 * 2 * D * F
    two = forward_flops_per_token(mixtral, 2.0, 512)
    one = forward_flops_per_token(mixtral, 1.0, 512)
    assert two - one == pytest.approx(32 * 3 * 2 * 4096 * 14336)
    adamoe = ModelConfig(**{**mixtral.__dict__, "moe": MoEConfig(router="null_experts", num_experts=8, num_null_experts=16,
                                                                top_k=4, baseline_top_k=2)})
    # published: 1.66 true experts per token -> ~15% fewer FLOPs ((1 - 1.66/2) * 0.876 = 14.9%)
    reduction = 1 - flops_vs_topk(adamoe, 1.66, 512)
    assert reduction == pytest.approx((1 - 1.66 / 2) * share, abs=0.003)


def test_generated_corpus_is_deterministic_and_labelled():
    a, la = generate(8, 64, 64, seed=3)
    b, lb = generate(8, 64, 64, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (8, 65) and a.max() < 64 and a.min() >= 0
    assert set(la.unique().tolist()) <= set(LABELS)
    assert any(int((la == h).sum()) > 0 for h in HARD_LABELS)
    # copy targets really are copies of the span before the separator
    toks, labs = a[0].tolist(), la[0].tolist()
    for j, lab in enumerate(labs):
        if lab == 2 and labs[j - 1] == 5:  # first copied token after the separator
            n = 0
            while j + n < len(labs) and labs[j + n] == 2:
                n += 1
            assert toks[j:j + n] == toks[j - 1 - n:j - 1][:n] or j + n == len(labs)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(1, 8, 16, 0)


def test_frozen_parameters_get_no_optimizer_state_and_do_not_change(tmp_path):
    from moe_train.config import Config, DataConfig, TrainConfig
    from moe_train.train import trainer as trainer_mod

    cfg = Config(model=ModelConfig(hidden_size=32, intermediate_size=64, max_seq_len=64,
                                   moe=MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=2)),
                 train=TrainConfig(steps=3, batch_size=4, seq_len=32, out_dir=str(tmp_path), tensorboard=False,
                                   trainable=[r"router\.", "lora_"], lora_rank=2, lora_targets=["attention"]),
                 data=DataConfig(num_sequences=16, val_sequences=0))
    seen = {}
    real = trainer_mod.build_optimizer

    def spy(model, cfg_, device):
        opt = real(model, cfg_, device)
        seen["model"], seen["opt"] = model, opt
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return opt

    trainer_mod.build_optimizer = spy
    try:
        trainer_mod.train(cfg)
    finally:
        trainer_mod.build_optimizer = real
    model, opt = seen["model"], seen["opt"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        trainable = "router." in name or "lora_" in name
        assert (id(p) in in_opt) == trainable, name
        assert (p in opt.state) == trainable, name
        if trainable:
            assert not torch.equal(p.detach(), seen["before"][name]), name
        elif not trainable:
            assert torch.equal(p.detach(), seen["before"][name]), name
    final = load_model(tmp_path / "final" / "model.pt")  # LoRA merged: a plain model
    assert not any("lora_" in n for n in final.state_dict())


@pytest.mark.parametrize("sets, needle", [
    (["data.kind=files", "data.path=/nonexistent/corpus.jsonl"], "does not exist"),
    (["train.seq_len=300"], "train.seq_len"),
    (["data.kind=files", "data.path=EMPTY", "model.vocab_size=260"], "shorter than one sequence"),
    (["data.kind=files", "data.path=TEXT"], "model.vocab_size=64"),  # the byte tokenizer needs 258 ids
])
def test_bad_input_fails_before_training_starts(tmp_path, capsys, sets, needle):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "text.jsonl").write_text('{"text": "hello world"}\n' * 50)
    sets = [s.replace("EMPTY", str(tmp_path / "empty.jsonl")).replace("TEXT", str(tmp_path / "text.jsonl"))
            for s in sets]
    out = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny_top2.yaml", "--set", f"train.out_dir={out}"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()  # nothing started


def test_tensorboard_events_and_hf_export(tmp_path):
    pytest.importorskip("tensorboard")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny_adamoe.yaml", "--set", "train.steps=3", "--set",
                 f"train.out_dir={out}", "--set", "data.num_sequences=64", "--set", "train.export_hf=true"]) == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    ours = load_model(out / "final" / "model.pt").eval()
    # null experts: the export ships its modeling code (io/hf_remote), which transformers runs with trust_remote_code
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", trust_remote_code=True).eval()
    assert hf.config.num_experts_per_tok == 2
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    from moe_train.io.hf import from_hf

    back = from_hf(out / "hf")
    assert torch.equal(back(ids), ours(ids))
