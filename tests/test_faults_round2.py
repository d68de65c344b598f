"""Faults and mistakes, second round: Ctrl-C / SSH hang-up handled like a preemption, launch/torchrun.sh's exit
status after a clean preemption, Ada-K's stale outputs / zero-step runs / non-finite guard, an HF export the family
cannot express refused at start, full and read-only disks reported in one line with the path. Every test takes
seconds (no training run; the launcher test runs a stand-in torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moe_train.train import preemption
from moe_train.train.preemption import Preempted, StopSignals, handles_stop_signals

REPO = Path(__file__).resolve().parents[1]


# ---- 1. Ctrl-C and SSH hang-up --------------------------------------------------------------------------------


def test_sigint_and_sighup_set_the_stop_flag_instead_of_ending_the_process():
    for sig in (signal.SIGINT, signal.SIGHUP):
        stop = StopSignals()
        with stop.installed():
            os.kill(os.getpid(), sig)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert stop.received == sig
            os.kill(os.getpid(), sig)  # a repeat at once (torchrun forwarding the terminal's Ctrl-C): no abort
            time.sleep(0.01)
        assert stop.reason() == sig.name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_second_ctrl_c_after_the_grace_period_aborts_at_once(monkeypatch):
    monkeypatch.setattr(preemption, "INTERRUPT_GRACE_S", 0.0)
    stop = StopSignals()
    with pytest.raises(KeyboardInterrupt), stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


def test_a_clean_preemption_leaves_the_launchers_marker(tmp_path, monkeypatch):
    monkeypatch.setenv(preemption.MARKER_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")

    class Fake:
        preemption = StopSignals()

        @handles_stop_signals
        def fit(self):
            raise Preempted(3, "SIGINT", None)

    with pytest.raises(Preempted):
        Fake().fit()
    assert (tmp_path / "rank_1").is_file()


def _launch(tmp_path: Path, markers: bool, sig: signal.Signals) -> tuple[int, str]:
    """launch/torchrun.sh with a stand-in torchrun that stops on a signal as torchrun does after its workers saved:
    exit 1, each worker's marker written (``markers``) or not."""
    shims = tmp_path / "bin"
    shims.mkdir()
    stub = shims / "torchrun"
    write = 'for i in 0 1; do echo > "$MOE_TRAIN_PREEMPTED_DIR/rank_$i"; done; ' if markers else ""
    stub.write_text(f'#!/usr/bin/env bash\ntrap \'{write}exit 1\' TERM HUP\ntouch "$READY"\n'
                    'while :; do sleep 0.05; done\n')
    stub.chmod(0o755)
    ready = tmp_path / "ready"
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", SKIP_CHECK="1", NPROC="2", READY=str(ready),
               MASTER_PORT=str(_free_port()))
    p = subprocess.Popen(["bash", "launch/torchrun.sh", "--config", "x.yaml"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.05)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=30)
    return p.returncode, out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_torchrun_script_exits_0_after_every_worker_saved_on_a_signal(tmp_path, sig):
    rc, out = _launch(tmp_path, markers=True, sig=sig)
    assert rc == 0, out
    assert "all 2 workers of this node stopped after a signal with a checkpoint" in out


def test_torchrun_script_keeps_torchruns_failure_when_workers_did_not_save(tmp_path):
    rc, out = _launch(tmp_path, markers=False, sig=signal.SIGTERM)
    assert rc == 1, out


# ---- 2. Ada-K ----------------------------------------------------------------------------------------------------


def test_adak_with_no_step_of_either_stage_is_refused_by_the_config():
    from moe_train.config import AdaKConfig, Config, ConfigError, validate

    with pytest.raises(ConfigError, match=r"adak.warm_start_steps \+ adak.ppo_steps.*nothing would train"):
        validate(Config(adak=AdaKConfig(warm_start_steps=0, ppo_steps=0)))


def test_adak_start_removes_the_previous_runs_outputs_only(tmp_path):
    from moe_train.train.adak import AdaKTrainer

    for name in ("final/model.pt", "warm_start/model.pt", "validation.json", "final/notes.txt", "mine.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("old")
    trainer = AdaKTrainer.__new__(AdaKTrainer)  # only out_dir is needed
    trainer.out_dir = tmp_path
    trainer.remove_crash_leftovers()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "final/notes.txt", "mine.json"]


def test_adak_non_finite_loss_or_gradient_fails_naming_the_step():
    import torch

    from moe_train.parallel.distributed import ParallelContext
    from moe_train.train.adak import _update
    from moe_train.train.engine import TorchEngine
    from moe_train.train.trainer import TrainingError

    w = torch.nn.Parameter(torch.ones(3))
    engine = TorchEngine(torch.nn.Identity(), torch.optim.AdamW([w]), ParallelContext(), params=[w])
    with pytest.raises(TrainingError, match="ppo step 7: non-finite allocator loss nan"):
        _update(engine, (w * float("nan")).sum(), 1.0, "ppo step 7")
    with pytest.raises(TrainingError, match="warm start step 2: non-finite allocator gradient norm"):
        handle = w.register_hook(lambda g: g * float("inf"))  # a finite loss with a non-finite gradient
        _update(engine, w.sum(), 1.0, "warm start step 2")
    handle.remove()
    assert torch.equal(w.detach(), torch.ones(3))  # no optimizer step from either


# ---- 3. an HF export the family cannot express ------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"moe": {"norm_topk_prob": False}}, "Mixtral checkpoint cannot express norm_topk_prob=False"),
    ({"family": "qwen3_moe", "shared_expert_intermediate_size": 16}, "Qwen3-MoE checkpoint cannot express a shared"),
])
def test_export_hf_the_family_cannot_express_is_refused_at_start(change, match):
    import dataclasses

    import torch

    from moe_train.config import Config, ModelConfig, MoEConfig
    from moe_train.model import MoETransformer
    from moe_train.preflight import check_export_hf

    moe = dataclasses.replace(MoEConfig(num_experts=4, top_k=2), **change.pop("moe", {}))
    model_cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, max_seq_len=64, moe=moe, **change)
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    cfg = Config(model=model_cfg)
    check_export_hf(cfg, model)  # export_hf false: nothing checked
    cfg.train.export_hf = True
    with pytest.raises(ValueError, match=f"train.export_hf: true, but .*{match}"):
        check_export_hf(cfg, model)


# ---- 4. full and read-only disks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code, words", [(28, "no space left on device"), (30, "read-only file system")])
def test_atomic_writer_reports_a_disk_fault_in_one_line_and_leaves_nothing(tmp_path, code, words):
    from moe_train.io.atomic import DiskWriteError, write_file_atomically

    def write(f):
        f.write(b"x" * 10)
        raise OSError(code, os.strerror(code))

    (tmp_path / "model.pt").write_bytes(b"old")
    with pytest.raises(DiskWriteError, match=f"cannot write '.*model.pt': {words}") as e:
        write_file_atomically(tmp_path / "model.pt", write)
    assert "\n" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and (tmp_path / "model.pt").read_bytes() == b"old"


def test_library_errors_that_wrap_a_full_disk_are_recognised():
    from moe_train.io.atomic import disk_errno

    class SafetensorError(Exception):
        pass

    class CheckpointException(Exception):
        def __init__(self, failures):
            super().__init__("failed")
            self.failures = failures

    assert disk_errno(SafetensorError("Error while serializing: IoError(Os { code: 28, ... os error 28")) == 28
    assert disk_errno(CheckpointException({0: (OSError(30, "Read-only file system"), "tb")})) == 30
    assert disk_errno(ValueError("bad")) is None


def test_dcp_save_on_a_full_disk_is_one_line_and_removes_its_staging(tmp_path, monkeypatch):
    import torch
    import torch.distributed.checkpoint as dcp

    from moe_train.io import dcp_checkpoint
    from moe_train.io.atomic import DiskWriteError
    from moe_train.parallel.distributed import ParallelContext

    def full(*a, **k):
        raise RuntimeError("CheckpointException ranks:dict_keys([0]) ... OSError: [Errno 28] No space left on device")

    monkeypatch.setattr(dcp, "save", full)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(DiskWriteError, match="step_00000003.*no space left on device"):
        dcp_checkpoint.save_checkpoint(tmp_path, 3, model, torch.optim.AdamW(model.parameters()), {},
                                       ParallelContext())
    assert not any(p.name.startswith(".") for p in dcp_checkpoint.checkpoint_root(tmp_path).iterdir())


def test_preflight_refuses_an_out_dir_without_room_for_one_checkpoint(tmp_path, monkeypatch):
    import shutil as sh

    import torch

    from moe_train import preflight
    from moe_train.config import Config
    from moe_train.model import MoETransformer

    cfg = Config()
    cfg.train.out_dir = str(tmp_path / "run")
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    preflight.check_disk_space(cfg, model)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ValueError, match=r"train.out_dir=.*GiB free.*needs at least"):
        preflight.check_disk_space(cfg, model)


def test_convert_dst_on_a_read_only_filesystem_is_refused_before_reading(tmp_path, monkeypatch):
    from moe_train.io import atomic

    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False)  # tests run as root: chmod would not stop it
    with pytest.raises(ValueError, match=r"--dst '.*out' cannot be written: .* not writable \(a read-only"):
        atomic.check_writable(tmp_path / "out", "--dst")


# ---- 5. a resume that cannot work is refused before the model is built --------------------------------------------


def test_resume_of_another_model_shape_is_refused_by_the_preflight(tmp_path, monkeypatch):
    """A checkpoint written by a 16-wide model, resumed with hidden_size 32: refused by check_train_inputs (before
    any process group or model), naming the key, the checkpoint's value and the way to accept it; the same
    checkpoint with the same shape passes the preflight."""
    import torch

    from moe_train import preflight
    from moe_train.config import Config, ModelConfig, MoEConfig
    from moe_train.io.dcp_checkpoint import MANIFEST
    from moe_train.train.fingerprint import ResumeConfigMismatch, launch_record

    def cfg(hidden: int) -> Config:
        c = Config(model=ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_layers=1,
                                     num_heads=2, num_kv_heads=1, max_seq_len=64,
                                     moe=MoEConfig(num_experts=4, top_k=2)))
        c.train.out_dir, c.train.steps, c.train.tensorboard = str(tmp_path / "run"), 4, False
        return c

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text("{}")
    torch.save({"step": 2, "config": launch_record(cfg(16), 1, 1)}, ckpt / "trainer.pt")
    monkeypatch.setattr(preflight, "preflight_data", lambda *a, **k: None)  # generated data: nothing to check
    built = []
    monkeypatch.setattr(preflight, "MoETransformer", lambda *a, **k: built.append(1))

    bad = cfg(32)
    bad.train.resume_from = str(ckpt)
    with pytest.raises(ResumeConfigMismatch, match=r"model.hidden_size: 16 in the checkpoint, 32 now.*"
                                                   r"resume_allow_changes=\[model.hidden_size\]"):
        preflight.check_train_inputs(bad, {"WORLD_SIZE": "1", "RANK": "0"})
    assert not built  # refused before the meta skeleton, let alone the model

    good = cfg(16)
    good.train.resume_from = str(ckpt)
    monkeypatch.setattr(preflight, "check_disk_space", lambda *a, **k: None)
    preflight.check_train_inputs(good, {"WORLD_SIZE": "1", "RANK": "0"})
    assert built


def test_adak_resume_with_a_changed_adak_setting_is_refused_by_the_preflight(tmp_path, monkeypatch):
    """Ada-K (train.init_from set: the model section is resolved later, by the run): a checkpoint written with
    adak.penalty 0.01 resumed with 0.02 is refused before the model is built; the model section is left to the
    run's own check, so the same config passes."""
    import torch

    from moe_train import preflight
    from moe_train.config import AdaKConfig, Config, ModelConfig, MoEConfig
    from moe_train.io.dcp_checkpoint import MANIFEST
    from moe_train.io.model_file import save_model
    from moe_train.model import build_model
    from moe_train.train.fingerprint import ResumeConfigMismatch, launch_record

    base = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2))
    save_model(build_model(base), tmp_path / "base.pt", step=0)

    def cfg(penalty: float) -> Config:
        c = Config(model=base, adak=AdaKConfig(k_min=0, k_max=3, warm_start_steps=2, ppo_steps=2, penalty=penalty))
        c.train.out_dir, c.train.init_from, c.train.tensorboard = str(tmp_path / "run"), str(tmp_path / "base.pt"), False
        c.train.seq_len = 32
        return c

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text("{}")
    stored = launch_record(cfg(0.01), 1, 1)
    stored["model"]["moe"]["router"] = "adak"  # the run's resolved model section differs: not compared here
    torch.save({"step": 2, "config": stored, "adak": {"stage": "warm_start", "step": 2}}, ckpt / "trainer.pt")
    monkeypatch.setattr(preflight, "preflight_data", lambda *a, **k: None)
    monkeypatch.setattr(preflight, "check_disk_space", lambda *a, **k: None)
    built = []
    monkeypatch.setattr(preflight, "MoETransformer", lambda *a, **k: built.append(1))

    with pytest.raises(ResumeConfigMismatch, match=r"adak.penalty: 0.01 in the checkpoint, 0.02 now"):
        preflight.check_train_inputs(cfg(0.02), {"WORLD_SIZE": "1", "RANK": "0"}, overwrite=True, adak=True)
    assert not built
    preflight.check_train_inputs(cfg(0.01), {"WORLD_SIZE": "1", "RANK": "0"}, overwrite=True, adak=True)
    assert built


def test_miniature_refuses_an_export_the_family_cannot_express_before_its_ranks_start(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "moe_train.cli", "train", "--config", "configs/tiny_adamoe.yaml",
                          "--miniature", "--set", "train.export_hf=true", "--set", "model.family=qwen3_moe",
                          "--set", "model.shared_expert_intermediate_size=16", "--set",
                          f"train.out_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot express a shared expert" in out.stderr and "Traceback" not in out.stderr
    assert "miniature [3/4]" not in out.stderr  # refused before any rank ran a step
