"""Faults that must not cost a run its good state (issue 17): a diverging run keeps its last good checkpoint and
fails loudly; a torn metrics line does not block a resume; a crash's temp folders go at the next start; what a run
writes is readable by the group (the umask decides, as for any file)."""

import json
import math
import os
import stat

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import moe_train.train.trainer as trainer_mod
from moe_train.cli import main
from moe_train.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig, to_dict
from moe_train.io.atomic import write_bytes_atomically, write_folder_atomically
from moe_train.io.dcp_checkpoint import complete_checkpoints, latest_checkpoint
from moe_train.io.model_file import load_model
from moe_train.train.trainer import train


def make_cfg(out, **train_kw):
    kw = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=100, out_dir=str(out),
              checkpoint_every=2, keep_last=2, tensorboard=False)
    kw.update(train_kw)
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=2, aux_loss_coef=0.01)
    return Config(model=ModelConfig(hidden_size=32, intermediate_size=64, max_seq_len=64, moe=moe),
                  train=TrainConfig(**kw), data=DataConfig(num_sequences=40, val_sequences=8))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def after_optimizer_step(monkeypatch, hook):
    """``hook(optimizer, n)`` runs after the n-th optimizer step (n from 1) of every optimizer the trainer builds."""
    real = trainer_mod.build_optimizer

    def build(model, cfg, device):
        opt = real(model, cfg, device)
        calls = {"n": 0}

        def post(optimizer, args, kwargs):
            calls["n"] += 1
            hook(optimizer, calls["n"])

        opt.register_step_post_hook(post)
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)


def nan_after_optimizer_step(monkeypatch, k):
    """From the k-th optimizer step on, the step leaves a NaN in one weight (as lr=30 does, without the wait)."""

    def poison(optimizer, n):
        if n >= k:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    after_optimizer_step(monkeypatch, poison)


def assert_finite_checkpoint(path, tmp_path):
    """The checkpoint loads (manifest-verified DCP) and every tensor in it, weights and moments, is finite."""
    flat = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(flat))
    state = torch.load(flat, weights_only=False)
    tensors = []

    def walk(x):
        if torch.is_tensor(x):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(state)
    assert len(tensors) > 10 and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_run_that_diverges_keeps_its_last_good_checkpoint_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(make_cfg(out))))
    nan_after_optimizer_step(monkeypatch, 7)  # steps 1-6 good (checkpoints 2, 4, 6), step 7 leaves a NaN weight
    rc = main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 1, err
    good = out / "checkpoints" / "step_00000006"
    assert "training failed" in err and "diverged at step 7" in err and str(good) in err
    assert "Traceback" not in err
    # nothing was written from the NaN state: the good checkpoints survive retention, no final model
    assert latest_checkpoint(out) == good
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert not (out / "final").exists()
    assert_finite_checkpoint(good, tmp_path)
    monkeypatch.undo()
    # the way out the message names: resume from it (lower lr) and finish
    result = train(make_cfg(out, resume_from=str(good), lr=1e-3))
    assert result["step"] == 12 and math.isfinite(result["loss"])
    assert all(torch.isfinite(v).all() for v in load_model(out / "final" / "model.pt").state_dict().values())


def test_a_run_that_keeps_producing_nan_losses_stops_at_max_bad_steps_without_saving(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = trainer_mod.lm_loss, {"n": 0}

    def lm_loss(*a, **k):  # from step 5 on every loss is NaN (weights stay finite: the steps are skipped)
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] >= 5 else 1.0)

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)
    with pytest.raises(trainer_mod.TrainingError, match=r"diverged at step 7: 3 steps skipped .*max_bad_steps=2.*"
                                                        r"last good checkpoint is .*step_00000006"):
        train(make_cfg(out, max_bad_steps=2))
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000004", "step_00000006"]
    assert not (out / "final").exists()
    assert [r["step"] for r in records(out) if r.get("skipped")] == [5, 6, 7]


def test_a_step_with_nan_gradients_is_skipped_and_leaves_the_weights_finite(tmp_path, monkeypatch):
    """A finite loss with NaN gradients (what lr=30 produced at step 3): skipped before AdamW writes the NaN into
    the weights and moments; the run goes on and its checkpoints and final model stay finite."""
    out = tmp_path / "run"
    real = trainer_mod.build_optimizer

    def build(model, cfg, device):
        opt = real(model, cfg, device)
        passes = {"n": 0}  # one backward pass per step (grad_accum_steps=1)
        param = next(p for p in model.parameters() if p.requires_grad)

        def hook(grad):
            passes["n"] += 1
            return grad * float("nan") if passes["n"] in (5, 6) else grad

        param.register_hook(hook)
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)
    result = train(make_cfg(out, max_bad_steps=5))
    rows = records(out)
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [5, 6]
    assert all("gradient norm nan" in r["reason"] and math.isfinite(r["loss"]) for r in skipped)
    assert result["step"] == 12 and math.isfinite(result["loss"]) and result["bad_steps"] == 2
    assert all(torch.isfinite(v).all() for v in load_model(out / "final" / "model.pt").state_dict().values())
    assert_finite_checkpoint(latest_checkpoint(out), tmp_path)


def test_a_huge_but_finite_optimizer_moment_is_not_taken_for_divergence(tmp_path, monkeypatch):
    """The fused check is a sum of squares, which overflows beyond ~1e19; the element-wise confirmation keeps a
    finite state training."""

    def huge(optimizer, n):
        if n == 3:
            p = optimizer.param_groups[0]["params"][0]
            optimizer.state[p]["exp_avg_sq"].view(-1)[0] = 1e30

    after_optimizer_step(monkeypatch, huge)
    result = train(make_cfg(tmp_path / "run", steps=4))
    assert result["step"] == 4 and math.isfinite(result["loss"]) and result["bad_steps"] == 0


def test_resume_after_a_full_disk_tore_the_last_metrics_line(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    real, calls = trainer_mod.lm_loss, {"n": 0}

    class Crash(Exception):
        pass

    def lm_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash()
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)
    with pytest.raises(Crash):
        train(make_cfg(out, steps=8, checkpoint_every=4))
    monkeypatch.undo()
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "lo')  # what a full disk leaves: half a record, no newline
    with caplog.at_level("WARNING", logger="moe_train.train"):
        result = train(make_cfg(out, steps=8, checkpoint_every=4))  # resumes from step 4
    assert result["step"] == 8
    assert any(str(metrics) in r.getMessage() and "line 7" in r.getMessage() for r in caplog.records)
    rows = records(out)  # every line is JSON again
    assert [r["step"] for r in rows if "val_loss" not in r] == list(range(1, 9))


def test_temporary_folders_of_a_crashed_run_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    leftovers = [ckpt / ".step_00000004.tmp", ckpt / ".step_00000002.old-0123abcd", out / ".hf.tmp-ab_12xyz",
                 out / ".hf.old-deadbeef"]
    leftover_files = [ckpt / ".latest.k2j_9x1a.tmp", out / ".metrics.jsonl.4f2a9c1b.tmp",
                      out / "final" / ".model.pt.a1b2c3d4.tmp"]
    for d in leftovers:
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"half")
    for f in leftover_files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    # look-alikes that are not ours: never touched
    users = [ckpt / "notes.tmp", out / ".hf.tmp-mine", out / ".step_00000004.tmp", out / "hf.old-deadbeef",
             out / ".data.tmp", out / "final" / ".model.pt.bak"]
    for f in users:
        f.write_bytes(b"mine")
    train(make_cfg(out, steps=2))
    assert not [p for p in leftovers + leftover_files if p.exists()]
    assert all(f.read_bytes() == b"mine" for f in users)
    assert latest_checkpoint(out).name == "step_00000002"


@pytest.fixture
def umask():
    def set_umask(mask):
        previous.append(os.umask(mask))

    previous = []
    yield set_umask
    if previous:
        os.umask(previous[0])


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_models_and_checkpoints_are_readable_by_the_group(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "run"
    train(make_cfg(out, steps=2, export_hf=True))
    folders = [out / "hf", out / "final", out / "checkpoints", latest_checkpoint(out)]
    files = [p for d in folders for p in d.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "model.pt", "latest", "manifest.json", "trainer.pt",
                                       ".metadata", "__0_0.distcp"}
    files.append(out / "metrics.jsonl")
    assert {str(d): oct(mode(d)) for d in folders if mode(d) != 0o755} == {}
    assert {str(f): oct(mode(f)) for f in files if mode(f) != 0o644} == {}


def test_atomic_writes_follow_the_umask_like_open(tmp_path, umask):
    umask(0o077)  # a user who wants private files gets them
    f = write_bytes_atomically(tmp_path / "a" / "x.bin", b"1")
    d = write_folder_atomically(tmp_path / "exp", lambda p: (p / "w.txt").write_text("w"))
    assert (mode(f), mode(d), mode(d / "w.txt")) == (0o600, 0o700, 0o600)
    umask(0o002)
    f = write_bytes_atomically(tmp_path / "a" / "x.bin", b"2")
    d = write_folder_atomically(tmp_path / "exp", lambda p: (p / "w.txt").write_text("w"))
    assert (mode(f), mode(d), mode(d / "w.txt")) == (0o664, 0o775, 0o664)
