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
