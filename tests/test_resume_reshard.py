"""A checkpoint saved at one world size / ep size resumes at another and continues the same trajectory:
2 ranks with ep=2 -> 1 process, and 1 process -> 2 ranks with ep=2 (torchrun, gloo)."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def args(out, *extra):
    return ["train", "--config", "configs/tiny_adamoe.yaml", "--set", "train.steps=6", "--set", "train.batch_size=4",
            "--set", "train.seq_len=32", "--set", "data.num_sequences=48", "--set", "data.val_sequences=4",
            "--set", "train.checkpoint_every=3", "--set", "train.keep_last=0", "--set", "train.tensorboard=false",
            "--set", "train.warmup_steps=2", "--set", "model.moe.expert_bias_rate=0.01",
            "--set", "parallel.global_aux_loss=true",  # the same objective at every world size
            "--set", f"train.out_dir={out}", *extra]


def run(argv, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "moe_train.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               free_port(), "-m", "moe_train.cli", *argv]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def trajectory(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "val_loss" not in r}


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_checkpoint_reshards_between_world_sizes(tmp_path, first, second):
    ref = tmp_path / "ref"
    run(args(ref, "--set", f"parallel.ep={first}"), first)
    resumed = tmp_path / "resumed"
    out = run(args(resumed, "--set", f"parallel.ep={second}",
                   "--set", f"train.resume_from={ref / 'checkpoints' / 'step_00000003'}"), second)
    assert "resumed from" in out and "at step 3" in out
    a, b = trajectory(ref), trajectory(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "lm_loss", "aux_loss", "true_experts_per_token"):
            assert abs(a[step][key] - b[step][key]) <= TOL, (step, key, a[step][key], b[step][key])
