"""What a user touches: launchers that fail once and clearly (--check, rank 0 alone prints, the Slurm dry run
outside Slurm, --dry-run from parallel.world_size, the miniature's phases and summary), `moe-train config
--explain`, the eval table and --baseline / --compare-topk on AdaMoE models, `moe-train plot`, TensorBoard tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.cli import main
from moe_train.config import ModelConfig, MoEConfig
from moe_train.io.model_file import save_model
from moe_train.model import build_model
from moe_train.train.metrics import tensorboard_scalars

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_adamoe.yaml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _cli(*args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_train.cli", *args], cwd=REPO, env=_env(**extra),
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------------
# launchers


def test_check_passes_a_good_config_and_fails_a_bad_one_with_one_line(tmp_path):
    ok = _cli("train", "--config", TINY, "--check", "--set", f"train.out_dir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr
    assert "checked for world 1 (dp 1 x ep 1)" in ok.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
    bad = _cli("train", "--config", TINY, "--check", "--nnodes", "1", "--procs-per-node", "3",
               "--set", "parallel.ep=2", "--set", f"train.out_dir={tmp_path / 'run'}")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "parallel.ep" in bad.stderr, bad.stderr


def test_only_rank_0_prints_a_user_error():
    args = ("train", "--config", TINY, "--set", "train.stepz=3")
    rank1 = _cli(*args, RANK="1", WORLD_SIZE="2")
    assert rank1.returncode == 2 and rank1.stderr.strip() == ""
    rank0 = _cli(*args, RANK="0", WORLD_SIZE="2")
    assert rank0.returncode == 2
    assert rank0.stderr.strip().splitlines() == [
        "moe-train: config error: train.stepz: unknown key; allowed keys here: " + rank0.stderr.split("here: ")[1].strip()]


def test_a_rank_outside_world_size_says_so_itself():
    """No rank 0 exists to print it: the rank outside WORLD_SIZE prints the launch error (it printed nothing)."""
    out = _cli("train", "--config", TINY, RANK="5", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    assert out.returncode == 2
    assert "RANK=5 / WORLD_SIZE=2" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_torchrun_launcher_checks_the_config_before_spawning_ranks():
    out = subprocess.run(["bash", "launch/torchrun.sh", "--config", TINY, "--set", "train.stepz=3"], cwd=REPO,
                         env=_env(NPROC="2", MASTER_PORT="29533"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("unknown key") == 1, out.stderr  # once, before torchrun (no rank ever started)
    assert "torchrun" not in out.stderr.lower()


def test_slurm_template_dry_run_outside_slurm_prints_the_configs_world():
    out = subprocess.run(["bash", "launch/slurm_mixtral_8x22b.sbatch"], cwd=REPO, env=_env(DRY_RUN="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("nodes 2 x 8 processes = world 16; mesh (dp=2, ep=8)")
    assert len([line for line in lines if line.startswith("rank")]) == 16
    assert "unbound variable" not in out.stderr


def test_dry_run_without_nnodes_reads_parallel_world_size(capsys, monkeypatch):
    for var in LAUNCH_VARS + ("SLURM_JOB_NODELIST",):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--config", TINY, "--dry-run", "--set", "parallel.ep=2",
                 "--set", "parallel.world_size=4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("nodes 1 x 4 processes = world 4; mesh (dp=2, ep=2)")
    assert main(["train", "--config", TINY, "--dry-run", "--procs-per-node", "2", "--set", "parallel.ep=2",
                 "--set", "parallel.world_size=4"]) == 0
    assert capsys.readouterr().out.startswith("nodes 2 x 2 processes = world 4")


def test_miniature_reports_phases_and_a_summary(tmp_path, capsys, caplog, monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    caplog.set_level("INFO", logger="moe_train.miniature")
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--miniature", "--set", f"train.out_dir={out}",
                 "--set", "train.checkpoint_every=2", "--set", "train.export_hf=true", "--set", "train.lora_rank=2",
                 "--set", "train.grad_accum_steps=2"]) == 0
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith("miniature [")]
    assert [p[:15] for p in phases] == ["miniature [1/4]", "miniature [2/4]", "miniature [3/4]", "miniature [4/4]"]
    summary = capsys.readouterr().out
    for needle in ("exercised:", "LoRA", "rank 2", "accumulation", "2 micro-batch", "checkpoints", "step_",
                   "export", "hf/ written", "proved:", "finite losses", "not proved:"):
        assert needle in summary, (needle, summary)


# ----------------------------------------------------------------------------------------------------------
# config --explain


def test_config_explain_lists_every_key_and_explains_one(capsys):
    assert main(["config", "--explain"]) == 0
    listing = capsys.readouterr().out
    assert "model.moe.router" in listing and "one of topk, adak, null_experts, top_p" in listing
    assert "train.batch_size" in listing and "sequences per optimizer step (global)" in listing
    assert main(["config", "--explain", "model.moe.null_kind"]) == 0
    one = capsys.readouterr().out
    assert "type:    str" in one and "default: zero" in one and "allowed: zero, identity, constant" in one
    assert "null expert" in one
    assert main(["config", "--explain", "train.stepz"]) == 2
    assert "closest: train.steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# eval


def _tiny(path: Path, router: str) -> str:
    moe = MoEConfig(router="null_experts", num_null_experts=8, top_k=4, baseline_top_k=2) if router == "null_experts" else MoEConfig()
    torch.manual_seed(0)
    save_model(build_model(ModelConfig(hidden_size=32, intermediate_size=32, num_layers=1, moe=moe)), path)
    return str(path)


def test_eval_table_baseline_and_compare_topk_on_an_adamoe_model(tmp_path, capsys):
    adamoe, top2 = _tiny(tmp_path / "adamoe.pt", "null_experts"), _tiny(tmp_path / "top2.pt", "topk")
    task = str(REPO / "tests" / "data" / "synthetic_mc.jsonl")
    assert main(["eval", "--checkpoint", adamoe, "--compare-topk", "--baseline", top2, "--task", task]) == 0
    table = capsys.readouterr().out
    assert "result" in table and "experts/tok" in table and "flops/topk" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("model:", "top2:",
                                                                                             "baseline:"))}
    assert set(rows) == {f"model:{task}", f"top2:{task}", f"baseline:{task}"}
    assert rows[f"top2:{task}"][3] == "2.000"  # true experts only, baseline_top_k = 2: exactly 2 per token
    assert main(["eval", "--checkpoint", adamoe, "--task", task, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["result"] == f"model:{task}" and "acc" in lines[0]
    assert main(["eval", "--checkpoint", top2, "--compare-topk", "--task", task]) == 2
    assert "--baseline PATH" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# plot and TensorBoard


def _fake_run(folder: Path, slope: float) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": s, "loss": 4 - slope * s, "true_experts_per_token": 1.5, "true_experts_per_layer": [1.4, 1.6],
             "flops_vs_topk": 0.8, "tokens_per_s": 1000.0 + s, "peak_memory_mb": 400.0} for s in range(1, 11)]
    rows.append({"step": 10, "val_loss": 3.5, "val_true_experts_per_token": 1.4})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "lo')
    return folder


def test_plot_writes_valid_pngs_comparing_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    a, b = _fake_run(tmp_path / "a", 0.1), _fake_run(tmp_path / "b", 0.2)
    assert main(["plot", str(a), str(b)]) == 0
    files = sorted((a / "plots").glob("*.png"))
    assert {f.name for f in files} == {f"run_{n}.png" for n in ("loss", "experts_per_layer", "flops_vs_topk",
                                                               "tokens_per_s", "memory", "overview")}
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(f).ndim == 3
        assert f.stat().st_size < 200_000
    assert main(["plot", str(a), "--out", str(tmp_path / "one"), "--only", "loss"]) == 0
    assert [f.name for f in (tmp_path / "one").iterdir()] == ["run_loss.png"]
    capsys.readouterr()
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(_fake_run(tmp_path / "a", 0.1))]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_tensorboard_tags_are_grouped():
    tags = dict(tensorboard_scalars({"step": 3, "loss": 2.0, "lr": 1e-3, "true_experts_per_token": 1.5,
                                     "true_experts_per_layer": [1.0, 2.0], "tokens_per_s": 10.0,
                                     "peak_memory_mb": 5.0, "val_loss": 2.5,
                                     "val_true_experts_by_label": {"copy": 1.2}, "stage": "ppo"}))
    assert tags == {"train/loss": 2.0, "train/lr": 1e-3, "routing/true_experts_per_token": 1.5,
                    "routing/true_experts_per_layer/layer_0": 1.0, "routing/true_experts_per_layer/layer_1": 2.0,
                    "system/tokens_per_s": 10.0, "system/peak_memory_mb": 5.0, "val/loss": 2.5,
                    "val/true_experts_by_label/copy": 1.2}
