"""Runs that must not meet: one writer per out_dir (the lock), resumes that refuse a changed job (the config
fingerprint) and let the allowed changes take effect, workers that stop when their launcher is killed."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moe_train.cli import main
from moe_train.config import ConfigError, apply_overrides, load_config, to_dict
from moe_train.io.dcp_checkpoint import latest_checkpoint, verify_checkpoint
from moe_train.io.lock import OutDirLock, OutDirLocked, process_start_time
from moe_train.train.fingerprint import ResumeConfigMismatch
from moe_train.train.trainer import train
from tests.test_launch import free_port
from tests.test_resume import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def cli_args(out, steps=2000, every=3, extra=()):
    return ["--config", "configs/tiny_adamoe.yaml", "--set", f"train.steps={steps}", "--set", "train.batch_size=4",
            "--set", "train.seq_len=32", "--set", "data.num_sequences=64", "--set", "data.val_sequences=4",
            "--set", f"train.out_dir={out}", "--set", "train.tensorboard=false", "--set", "train.log_every=1000",
            "--set", f"train.checkpoint_every={every}", "--set", "train.keep_last=2",
            "--set", "parallel.rendezvous_timeout_s=60", *extra]


def wait_for(cond, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) while waiting for {what}: "
                                 f"{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lock_record(out):
    try:
        return json.loads((Path(out) / ".lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


def children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ----------------------------------------------------------------------------------------------------------
# one writer per out_dir


def test_second_run_on_a_busy_out_dir_is_refused_and_the_first_is_untouched(tmp_path, caplog):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "moe_train.cli", "train", *cli_args(out)], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: lock_record(out).get("pid") == first.pid and latest_checkpoint(out) is not None, 240,
                 "the first run's lock and first checkpoint", first)
        config_before = (out / "config.yaml").read_bytes()
        second = subprocess.run([sys.executable, "-m", "moe_train.cli", "train",
                                 *cli_args(out, extra=("--set", "train.lr=1.0e-3"))], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"pid {first.pid} on host" in second.stderr and "in use by another run" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # still training
        assert (out / "config.yaml").read_bytes() == config_before  # the refused run wrote nothing
        wait_for(lambda: latest_checkpoint(out).name >= "step_00000006", 240, "a checkpoint after the refusal",
                 first)
    finally:
        first.kill()
        first.wait()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records
    verify_checkpoint(latest_checkpoint(out))
    # the killed run's lock is stale (its process is gone): the next run takes it over, with a warning
    with caplog.at_level(logging.WARNING, logger="moe_train.io.lock"):
        with OutDirLock(out) as lock:
            assert lock.record["pid"] == os.getpid()
    assert f"pid {first.pid}" in caplog.text and "stale" in caplog.text
    assert (out / ".lock").read_text() == ""  # released


def test_lock_of_a_reused_pid_is_stale_and_a_live_holder_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": process_start_time(os.getpid()),
          "since": "2020-01-01T00:00:00"}
    # the record names this very process (alive, same start time) but no flock is held: a filesystem that does
    # not honour flock; the record is all there is, so it is believed
    (out / ".lock").write_text(json.dumps(me))
    with pytest.raises(OutDirLocked, match=f"pid {os.getpid()} on host .*since 2020-01-01"):
        OutDirLock(out).acquire()
    # same pid, another start time: the number was reused by another process, the holder is gone
    (out / ".lock").write_text(json.dumps({**me, "start_time": me["start_time"] - 1}))
    with caplog.at_level(logging.WARNING, logger="moe_train.io.lock"):
        with OutDirLock(out):
            with pytest.raises(OutDirLocked, match="in use by another run"):
                OutDirLock(out).acquire()  # a held flock refuses whatever the record says
    assert "stale" in caplog.text


def test_train_on_a_locked_out_dir_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    with OutDirLock(out):
        rc = main(["train", *cli_args(out, steps=2)])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {os.getpid()}" in err and "train.out_dir" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no metrics, config.yaml or checkpoint written


def test_two_rank_run_on_a_locked_out_dir_fails_on_every_rank(tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "NPROC": "2", "MASTER_PORT": free_port()}
    with OutDirLock(out):
        start = time.monotonic()
        result = subprocess.run(["bash", "launch/torchrun.sh", *cli_args(out, steps=2, extra=(
            "--set", "parallel.ep=2", "--set", "parallel.rendezvous_timeout_s=120"))], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - start
    text = result.stdout + result.stderr
    assert result.returncode != 0
    # rank 0 refused and rank 1 learnt it through the rendezvous store (not by waiting 120 s for a group)
    assert text.count("is in use by another run") == 1, text[-3000:]  # every rank fails; rank 0 alone says why
    assert elapsed < 100, elapsed
    assert not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------
# the config fingerprint


def _write_config(path, cfg):
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return str(path)


def test_resume_with_another_model_shape_refuses_listing_the_key(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(out, steps=2, checkpoint_every=0)
    train(cfg)
    config = _write_config(tmp_path / "c.yaml", cfg)
    rc = main(["train", "--config", config, "--set", "model.intermediate_size=96", "--set", "train.steps=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.intermediate_size: 64 in the checkpoint, 96 now" in err
    assert "train.resume_allow_changes=[model.intermediate_size]" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resume_with_a_changed_lr_uses_the_new_lr(tmp_path, caplog):
    out = tmp_path / "run"
    train(make_cfg(out, steps=2, lr=3e-3, schedule="constant", warmup_steps=0))
    with caplog.at_level(logging.INFO, logger="moe_train.train"):
        train(make_cfg(out, steps=4, lr=1e-3, schedule="constant", warmup_steps=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows if "lr" in r] == [(1, 3e-3), (2, 3e-3), (3, 1e-3), (4, 1e-3)]
    assert "train.lr 0.003 -> 0.001" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-3  # what ran


def test_resume_allow_changes_lets_a_refused_change_through(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = make_cfg(out, steps=2, checkpoint_every=0)
    train(cfg)
    changed = apply_overrides(cfg, ["model.moe.aux_loss_coef=0.05", "train.steps=3"])
    with pytest.raises(ResumeConfigMismatch, match=r"model\.moe\.aux_loss_coef: 0\.01 in the checkpoint, 0\.05"):
        train(changed)
    allowed = apply_overrides(changed, ["train.resume_allow_changes=[model.moe]"])
    with caplog.at_level(logging.INFO, logger="moe_train.train"):
        assert train(allowed)["step"] == 3
    assert "resumed from" in caplog.text and "model.moe.aux_loss_coef" in caplog.text
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes\[0\]"):
        apply_overrides(cfg, ["train.resume_allow_changes=[model.hiden_size]"])


# ----------------------------------------------------------------------------------------------------------
# workers and their launcher


def test_kill_9_of_torchrun_stops_its_workers_and_the_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**ENV, "NPROC": "2", "MASTER_PORT": free_port()}
    args = cli_args(out, every=2, extra=("--set", "parallel.ep=2"))
    launcher = subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        wait_for(lambda: latest_checkpoint(out) is not None, 300, "the first checkpoint", launcher)
        # launch/torchrun.sh -> torchrun -> the workers (the script stays to forward signals and map the exit)
        workers = [w for t in children(launcher.pid) for w in [t, *children(t)]]
        assert len(workers) == 3, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "workers outlived their launcher"
    finally:
        for p in [launcher.pid, *children(launcher.pid), *workers]:  # orphans too, should the test fail
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    ckpt = latest_checkpoint(out)
    manifest = verify_checkpoint(ckpt)
    assert manifest["world_size"] == 2
    # the checkpoint resumes (here on one rank: DCP reshards, the launch's world and ep may change)
    sets = [a for a in args[2:] if a != "--set"] + ["parallel.ep=1", f"train.steps={manifest['step'] + 1}"]
    result = train(load_config(REPO / "configs/tiny_adamoe.yaml", sets))
    assert result["step"] == manifest["step"] + 1
