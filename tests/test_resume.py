"""Resumable checkpoints: kill-and-resume equals an uninterrupted run, a crash mid-save leaves the previous
checkpoint, corruption is detected with a clear error, retention keeps the last N."""

import json

import pytest
import torch

import moe_train.io.dcp_checkpoint as resume_mod
import moe_train.train.trainer as trainer_mod
from moe_train.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig
from moe_train.io.dcp_checkpoint import CheckpointError, complete_checkpoints, latest_checkpoint
from moe_train.io.model_file import load_model
from moe_train.train.trainer import train


def make_cfg(out, **train_kw):
    kw = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=100, out_dir=str(out),
              checkpoint_every=4, tensorboard=False)
    kw.update(train_kw)
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=2, aux_loss_coef=0.01,
                    expert_bias_rate=0.01, target_true_experts=1.0)
    return Config(model=ModelConfig(hidden_size=32, intermediate_size=64, max_seq_len=64, moe=moe),
                  train=TrainConfig(**kw), data=DataConfig(num_sequences=40, val_sequences=8))


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "val_loss" not in r]


class Crash(Exception):
    pass


def crash_at_step(monkeypatch, n):
    calls = {"n": 0}
    real = trainer_mod.lm_loss

    def lm_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash()
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(make_cfg(ref))
    run = tmp_path / "run"
    crash_at_step(monkeypatch, 7)
    with pytest.raises(Crash):
        train(make_cfg(run))
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "step_00000004"
    assert max(s for s, _ in losses(run)) == 6  # the crashed run logged steps 5, 6 after its checkpoint
    train(make_cfg(run))  # resumes from step 4
    assert losses(run) == losses(ref)  # bit-identical trajectory: data position, RNG, optimizer, routing state
    a, b = load_model(ref / "final" / "model.pt"), load_model(run / "final" / "model.pt")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n  # includes expert_bias and the budget controller's null_bias


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = resume_mod.dcp.save
    calls = {"n": 0}

    def flaky_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 8) dies half-way
            real_save(state, checkpoint_id=checkpoint_id)
            raise Crash()
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(resume_mod.dcp, "save", flaky_save)
    with pytest.raises(Crash):
        train(make_cfg(out))
    monkeypatch.undo()
    assert latest_checkpoint(out).name == "step_00000004"
    assert (out / "checkpoints" / ".step_00000008.tmp").is_dir()  # the half-written one is not a checkpoint
    train(make_cfg(out))
    assert not (out / "checkpoints" / ".step_00000008.tmp").exists()
    assert latest_checkpoint(out).name == "step_00000012"


def test_corruption_detected_and_previous_still_loads(tmp_path):
    out = tmp_path / "run"
    train(make_cfg(out, steps=8))
    latest = latest_checkpoint(out)
    shard = next(p for p in latest.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupted: __0_0.distcp .*step_00000004"):
        train(make_cfg(out, steps=8))
    previous = out / "checkpoints" / "step_00000004"
    result = train(make_cfg(out, steps=8, resume_from=str(previous)))
    assert result["step"] == 8
    (previous / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        train(make_cfg(out, steps=8, resume_from=str(previous)))


def test_keep_last(tmp_path):
    out = tmp_path / "run"
    train(make_cfg(out, steps=12, checkpoint_every=2, keep_last=2))
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000010", "step_00000012"]


def test_resume_keeps_the_steps_periodic_validation_and_drops_only_the_final_one(tmp_path):
    """A run with train.eval_every, extended after it finished: the records of its steps (those carrying a periodic
    validation included) stay as written; only the old end-of-run validation line goes."""
    out = tmp_path / "run"
    train(make_cfg(out, steps=8, eval_every=4))
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before if "val_loss" in r and "loss" in r] == [4]  # step 4's own record
    train(make_cfg(out, steps=12, eval_every=4))  # resumes from step 8
    after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert after[:8] == before[:8]
    assert [r["step"] for r in after if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in after if "val_loss" in r and "loss" not in r] == [12]
