"""Preemption and kills lose nothing: a SIGTERM mid-run (one process), Slurm's SIGUSR1 warning through the Slurm
template and torchrun (2 ranks), and a seeded kill -9 campaign (random moments, mid-save, the torchrun launcher
alone), each resumed to the end and compared bit for bit with an uninterrupted run (same world, same kernels).

The runs are real processes receiving real signals. Single-process runs and the 2-rank references are forked from
a forkserver that has imported torch and moe_train once (a fresh interpreter costs seconds of import per launch on
this machine); the Slurm template and the launcher kill use the real scripts and torchrun.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_train.io.dcp_checkpoint import checkpoint_root, latest_checkpoint, verify_checkpoint
from moe_train.io.model_file import load_model

REPO = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("forkserver")
BIN = os.path.dirname(sys.executable)


def _args(out: Path, steps: int, checkpoint_every: int, ep: int = 1) -> list[str]:
    """The tiny AdaMoE config, small enough that a step takes tens of milliseconds."""
    sets = {"train.steps": steps, "train.batch_size": 4, "train.seq_len": 32, "data.num_sequences": 64,
            "data.val_sequences": 4, "train.out_dir": out, "train.tensorboard": "false", "train.log_every": 1000,
            "train.checkpoint_every": checkpoint_every, "parallel.ep": ep, "parallel.rendezvous_timeout_s": 60}
    return ["--config", "configs/tiny_adamoe.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _cli(argv: list[str], env: dict, log: str) -> None:
    """A forked run of ``moe-train <argv>``: output to ``log``, exit status as the command line's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    os.environ.update(env)
    from moe_train.cli import main

    sys.exit(main(argv))


def _cli_slow_save(argv: list[str], env: dict, log: str) -> None:
    """``_cli`` with each checkpoint's DCP write followed by a second's pause: the save is then in progress (its
    .step_*.tmp folder written but not committed) long enough to kill the process there; ``log + ".saving"``
    appears when it is (a leftover .tmp folder of an earlier kill would not tell this run's save from it)."""
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def slow_save(*args, **kwargs):
        result = real_save(*args, **kwargs)
        Path(log + ".saving").touch()
        time.sleep(1.0)
        return result

    dcp.save = slow_save
    _cli(argv, env, log)


def _noop() -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def forkserver():
    """The forkserver, started once with torch and moe_train imported and one thread per process (the reference
    and the resumed runs must use the same kernels and thread count to agree bit for bit)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        FORK.set_forkserver_preload(["moe_train.cli", "moe_train.train.trainer", "moe_train.io.dcp_checkpoint"])
        p = FORK.Process(target=_noop)
        p.start()
        p.join()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    yield


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start(args: list[str], log: Path, env: dict | None = None, target=_cli):
    p = FORK.Process(target=target, args=(["train", *args], env or {}, str(log)))
    p.start()
    return p


def start_ranks(args: list[str], log: Path, world: int = 2) -> list:
    """A ``world``-rank run without torchrun: one forked process per rank, rendezvous on a free local port."""
    port = free_port()
    return [start(args, log.with_suffix(f".rank{r}.log"), {"RANK": str(r), "WORLD_SIZE": str(world),
                                                             "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                                             "MASTER_PORT": port}) for r in range(world)]


def finish(procs, timeout: float = 240) -> list[int]:
    for p in procs:
        p.join(timeout)
        assert p.exitcode is not None, "run did not end in time"
    return [p.exitcode for p in procs]


def records(out: Path) -> list[dict]:
    """metrics.jsonl, tolerating a line being written while it is read."""
    path = out / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r and "val_loss" not in r]


def last_logged(out: Path) -> int:
    return max((s for s, _ in losses(out)), default=0)


def wait_until(cond, timeout: float = 180, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def same_final_model(a: Path, b: Path) -> None:
    x, y = load_model(a / "final" / "model.pt").state_dict(), load_model(b / "final" / "model.pt").state_dict()
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


STEPS, STEPS_2 = 40, 30  # single process / 2 ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run that the SIGTERM test and the kill campaign compare with."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    assert finish([start(_args(out, STEPS, 4), out.with_suffix(".log"))]) == [0]
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    return out


@pytest.fixture(scope="module")
def reference_2_ranks(tmp_path_factory):
    """One uninterrupted 2-rank (ep=2) run for the Slurm test and the launcher kill."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    assert finish(start_ranks(_args(out, STEPS_2, 10, ep=2), out.with_suffix(".log"))) == [0, 0]
    assert [s for s, _ in losses(out)] == list(range(1, STEPS_2 + 1))
    return out


def test_sigterm_mid_run_checkpoints_the_step_exits_0_and_resumes_with_no_lost_step(tmp_path, reference):
    out = tmp_path / "run"
    args = _args(out, STEPS, 4)
    p = start(args, tmp_path / "run.log")
    wait_until(lambda: last_logged(out) >= 5 or not p.is_alive(), what="5 logged steps")
    os.kill(p.pid, signal.SIGTERM)
    assert finish([p]) == [0], (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    stopped = last_logged(out)
    assert 5 <= stopped < STEPS, "the signal must land mid-run"
    assert f"rank 0: SIGTERM: stopping after step {stopped}" in log
    assert "Traceback" not in log
    latest = latest_checkpoint(out)
    assert latest.name == f"step_{stopped:08d}"  # the checkpoint of the last completed step, whatever the cadence
    assert verify_checkpoint(latest)["step"] == stopped
    assert finish([start(args, tmp_path / "resume.log")]) == [0]  # the same command resumes
    assert f"resumed from {latest} at step {stopped}" in (tmp_path / "resume.log").read_text()
    assert losses(out) == losses(reference)  # every step once, bit for bit
    same_final_model(out, reference)


def _slurm_shims(tmp_path: Path) -> Path:
    """srun / scontrol stand-ins for one node: srun runs its task in place, so a signal the batch script sends to
    "srun" reaches torchrun as srun's forwarding would; scontrol resolves the node list and records requeues."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (shims / "scontrol").write_text('#!/usr/bin/env bash\nif [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; '
                                    'exit 0; fi\necho "$*" >> "$SCONTROL_LOG"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    return shims


def test_slurm_template_requests_the_warning_signal_and_requeue():
    text = (REPO / "launch/slurm_mixtral_8x22b.sbatch").read_text()
    assert subprocess.run(["bash", "-n", "launch/slurm_mixtral_8x22b.sbatch"], cwd=REPO).returncode == 0
    for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "trap on_warning USR1", "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text, line


def test_slurm_sigusr1_warning_stops_both_ranks_at_one_step_and_requeues(tmp_path, reference_2_ranks):
    out = tmp_path / "run"
    args = _args(out, STEPS_2, 10, ep=2)
    env = {**os.environ, "PATH": f"{_slurm_shims(tmp_path)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "2", "CONFIG": "configs/tiny_adamoe.yaml",
           "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    env.pop("DRY_RUN", None)
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(["bash", "launch/slurm_mixtral_8x22b.sbatch", *args[2:]], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: last_logged(out) >= 3 or job.poll() is not None, what="3 logged steps")
        os.kill(job.pid, signal.SIGUSR1)  # what Slurm does 300 s before the time limit (--signal=B:USR1@300)
        assert job.wait(timeout=240) == 0, (tmp_path / "job.log").read_text()[-4000:]
    text = (tmp_path / "job.log").read_text()
    stopped = last_logged(out)
    assert 3 <= stopped < STEPS_2, "the signal must land mid-run"
    for rank in (0, 1):  # every rank stopped after the same step (else the collective save would not finish)
        assert f"rank {rank}: SIGUSR1: stopping after step {stopped}" in text, text[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 42"
    manifest = verify_checkpoint(latest_checkpoint(out))
    assert (manifest["step"], manifest["world_size"]) == (stopped, 2)
    # the requeued job: the same command on the same world resumes from that checkpoint
    assert finish(start_ranks(args, tmp_path / "resume.log")) == [0, 0]
    assert losses(out) == losses(reference_2_ranks)
    same_final_model(out, reference_2_ranks)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _worker_pids(launcher_pid: int) -> list[int]:
    """The workers of launch/torchrun.sh: the script runs torchrun, torchrun runs them."""
    return [w for t in _children(launcher_pid) for w in _children(t)]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended (an orphan's reaper may be slow, or absent in a container)


def test_kill_9_campaign_random_moments_mid_save_and_launcher_alone_loses_nothing(tmp_path, reference,
                                                                                  reference_2_ranks):
    rng = random.Random(17)
    out = tmp_path / "run"
    args = _args(out, STEPS, 4)
    # kill points: 4 random moments (after a random logged step, plus a random delay that lands anywhere in a
    # step: forward, optimizer, metrics write, checkpoint), then one while a checkpoint is being saved
    # (each moment a few steps past what the previous killed run logged: a fast machine logs several steps between
    # reaching the chosen step and the kill, so fixed steps drawn up front could overrun the run's end)
    points = [("moment", rng.randint(1, 4)) for _ in range(4)] + [("mid-save", None)]
    survived, report = 0, []
    for kind, step in points:
        log = tmp_path / f"kill{len(report)}.log"
        if kind == "moment":
            # past what the previous (killed) run logged: the file is then this run's, not the previous one's
            step = max(3, last_logged(out) + 1 + step)
            assert step < STEPS
            p = start(args, log)
            wait_until(lambda: last_logged(out) >= step or not p.is_alive(), what=f"step {step}")
            time.sleep(rng.uniform(0, 0.15))
        else:
            p = start(args, log, target=_cli_slow_save)
            wait_until(lambda: Path(f"{log}.saving").exists() or not p.is_alive(), what="a save")
        assert p.is_alive(), log.read_text()[-3000:]
        tmp_seen = [t.name for t in checkpoint_root(out).glob(".step_*.tmp")]
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        latest = latest_checkpoint(out)
        verify_checkpoint(latest)  # the newest checkpoint is always complete and intact
        report.append((kind, last_logged(out), latest.name, tmp_seen))
        if kind == "mid-save":
            assert tmp_seen, "the kill must land inside a save"
            assert f".{latest.name}.tmp" not in tmp_seen  # the interrupted save is not the latest
        survived += 1
    assert finish([start(args, tmp_path / "final.log")]) == [0], (tmp_path / "final.log").read_text()[-3000:]
    assert losses(out) == losses(reference), report
    same_final_model(out, reference)
    assert not any(checkpoint_root(out).glob(".step_*.tmp"))  # the next start cleaned the interrupted save

    # the torchrun launcher alone (kill -9): its workers must not go on training and saving without it; they get
    # SIGTERM (parent-death signal, parallel/launch.py) and stop like a preempted run, with a checkpoint
    out2 = tmp_path / "run2"
    args2 = _args(out2, STEPS_2, 10, ep=2)
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1",
           "PATH": BIN + os.pathsep + os.environ["PATH"]}
    with open(tmp_path / "torchrun.log", "w") as log:
        launcher = subprocess.Popen(["bash", "launch/torchrun.sh", "--config", "configs/tiny_adamoe.yaml", *args2[2:]],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        step = rng.randint(3, 8)
        wait_until(lambda: last_logged(out2) >= step or launcher.poll() is not None, what=f"step {step}")
        workers = _worker_pids(launcher.pid)
        assert len(workers) == 2 and launcher.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        launcher.kill()
        launcher.wait()
        wait_until(lambda: all(_gone(w) for w in workers), timeout=60, what="the workers to stop")
    latest = latest_checkpoint(out2)
    assert latest is not None, "the workers stopped without writing a checkpoint"  # the first periodic one is step 10
    verify_checkpoint(latest)
    report.append(("launcher", last_logged(out2), latest.name, []))
    survived += 1
    assert finish(start_ranks(args2, tmp_path / "resume2.log")) == [0, 0]
    assert losses(out2) == losses(reference_2_ranks), report
    same_final_model(out2, reference_2_ranks)
    print(f"kill -9 campaign: {survived}/{len(report)} kills survived with nothing lost: {report}")
