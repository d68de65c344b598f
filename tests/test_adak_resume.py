"""Resumable Ada-K checkpoints (train/adak.py AdaKTrainer.checkpoint_stage / resume_stage; docs/adak.md).

A run stopped by a real SIGTERM (raised on rank 0 only, after a chosen step: the stop must be agreed over the ranks)
in the warm start or in PPO, then started again with the same config, must give the uninterrupted run's metrics
(losses, label statistics, rewards, log-likelihoods, k, PPO statistics: every field but the wall time) and final
allocator weights BIT for bit: the checkpoint holds everything the remaining steps depend on (allocators, the stage's
AdamW moments, the data position, the PPO generator and running-mean baseline). The reference is the same config run
without interruption (and without periodic checkpoints). Cases: 1 process; 2 gloo ranks with ep 2 under the FSDP2
engine (warm start and PPO); DeepSpeed ZeRO-1 at 2 ranks, ep 2 (PPO). Each checkpoint holds the allocators and
their optimizer state only, never the frozen base. A resume whose config changes the math is refused with the
fingerprint's message.
"""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch

from moe_train.config import Config, from_dict, to_dict, validate
from moe_train.io.dcp_checkpoint import complete_checkpoints
from moe_train.io.model_file import ModelFileReader, save_model
from moe_train.parallel.distributed import ParallelContext
from moe_train.train.adak import AdaKTrainer, train_adak
from moe_train.train.fingerprint import ResumeConfigMismatch
from moe_train.train.preemption import Preempted

import adak_workers as A
import ep_workers as W

pytestmark = pytest.mark.usefixtures("one_thread")

_STOP: list = [None]  # (stage, step) after which rank 0 raises SIGTERM; None: no signal


def _signalling(original):
    def stop_if_preempted_adak(self, stage: str, step: int) -> None:
        if _STOP[0] == (stage, step) and self.ctx.rank == 0:
            signal.raise_signal(signal.SIGTERM)  # the real handler (train/preemption.py) sets the flag
        return original(self, stage, step)

    return stop_if_preempted_adak


def config(base: Path, out: Path, ep: int = 1, **train) -> Config:
    """3 warm-start + 3 PPO steps; the running-mean baseline (state carried across steps) and 2 PPO minibatches
    (permutations drawn from the run's generator), so a resume that lost either would differ."""
    cfg = A.job_config(str(base), str(out), warm=3, ppo=3, ep=ep, minibatches=2)
    cfg.adak.baseline = "running_mean"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    validate(cfg)
    return cfg


def run(cfg: Config, stop=None, ctx=None) -> str:
    """train_adak, stopped by SIGTERM after ``stop`` when given; 'preempted' or 'finished'."""
    _STOP[0] = stop
    try:
        train_adak(cfg, ctx=ParallelContext() if ctx is None else ctx)
        return "finished"
    except Preempted:
        return "preempted"
    finally:
        _STOP[0] = None


def run_jobs(jobs: list[dict]) -> dict:
    """Rank side (2 gloo ranks): each job {"name", "cfg", "stops"} runs train_adak once per entry of stops (a
    (stage, step) to stop after, or None to run to the end) in the same out_dir; returns what each run ended as."""
    from moe_train.parallel.distributed import init_distributed

    AdaKTrainer.stop_if_preempted_adak = _signalling(AdaKTrainer.stop_if_preempted_adak)
    ctx, out = None, {}
    for job in jobs:
        cfg = from_dict(Config, copy.deepcopy(job["cfg"]))
        validate(cfg)
        ctx = ctx or init_distributed(cfg.parallel, cfg.model.moe.num_experts)
        out[job["name"]] = [run(cfg, None if s is None else tuple(s), ctx) for s in job["stops"]]
    return out


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def allocators(out: Path) -> dict[str, torch.Tensor]:
    reader = ModelFileReader(out / "final" / "model.pt")
    return {k: reader.get(k) for k in reader.specs if k.endswith(A.ALLOCATOR)}


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = metrics(out), metrics(ref)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    assert got == want  # every figure of every step, bit for bit
    a, b = allocators(out), allocators(ref)
    assert a.keys() == b.keys() and len(a) == 2
    for k in a:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k


def assert_allocators_only(checkpoint: Path) -> None:
    """The checkpoint's model entries are the allocators (+ the optimizer's state of them): no frozen base."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model = [k for k in keys if k.startswith("model.")]
    assert model and all(k.endswith(A.ALLOCATOR) for k in model), model
    assert all(A.ALLOCATOR in k for k in keys if k.startswith("optim.state.")), keys


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adak_resume") / "base.pt"
    save_model(A.base_model(), path)
    return path


@pytest.fixture
def signalling(monkeypatch):
    monkeypatch.setattr(AdaKTrainer, "stop_if_preempted_adak", _signalling(AdaKTrainer.stop_if_preempted_adak))


@pytest.fixture(scope="module")
def reference(base) -> Path:
    out = base.parent / "ref1"
    assert run(config(base, out)) == "finished"
    return out


@pytest.mark.parametrize("stop", [("warm_start", 2), ("ppo", 2)])
def test_one_process_resume_is_bit_identical(base, reference, signalling, stop):
    out = base.parent / f"one_{stop[0]}"
    # periodic checkpoints at every step, 2 kept: they must not change the trajectory either
    cfg = config(base, out, checkpoint_every=1, keep_last=2)
    assert run(cfg, stop) == "preempted"
    saved = complete_checkpoints(out)
    stopped_at = stop[1] + (3 if stop[0] == "ppo" else 0)  # folders number both stages' steps in run order
    assert [p.name for p in saved] == [f"step_{n:08d}" for n in (stopped_at - 1, stopped_at)]
    assert_allocators_only(saved[-1])
    # a save killed half-way leaves only its hidden staging folder (the rename into place comes last): never resumed
    torn = out / "checkpoints" / f".step_{stopped_at + 1:08d}.tmp"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"torn")
    assert run(cfg) == "finished"
    assert not torn.exists()  # removed as the resumed run's crash leftover
    assert_same_run(out, reference)
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000005", "step_00000006"]  # keep_last 2
    assert (out / "warm_start" / "model.pt").is_file() and (out / "validation.json").is_file()


def test_changed_math_is_refused_on_resume(base, signalling):
    out = base.parent / "refused"
    assert run(config(base, out), ("ppo", 1)) == "preempted"
    changed = config(base, out)
    changed.adak.penalty = 0.01
    with pytest.raises(ResumeConfigMismatch, match=r"cannot resume from .*step_00000004.*adak\.penalty: 0\.003 in "
                                                    r"the checkpoint, 0\.01 now.*resume_allow_changes"):
        run(changed)
    changed = config(base, out)
    changed.adak.ppo_steps = 4  # a longer PPO stage may be asked for: it resumes
    assert run(changed) == "finished"
    assert [(r["stage"], r["step"]) for r in metrics(out)][-4:] == [("ppo", s) for s in (1, 2, 3, 4)]


def test_not_an_adak_checkpoint_is_refused(base, tmp_path):
    """A pre-training run's checkpoint in out_dir: refused before any step, naming what to do."""
    from moe_train.config import ModelConfig, MoEConfig, TrainConfig
    from moe_train.train.trainer import train

    cfg = Config(model=ModelConfig(**A.TINY, moe=MoEConfig(num_experts=4, top_k=2)),
                 train=TrainConfig(steps=1, batch_size=4, seq_len=16, out_dir=str(tmp_path), tensorboard=False))
    cfg.data.num_sequences, cfg.data.val_sequences = 16, 0
    train(cfg, ParallelContext())
    adak = config(base, tmp_path)
    adak.train.resume_allow_changes = ["*"]  # past the fingerprint: the checkpoint's kind is the next check
    with pytest.raises(ValueError, match="not written by an Ada-K run"):
        run(adak)


@pytest.fixture(scope="module")
def two_ranks(base):
    root = base.parent / "two"
    (root / "spawn").mkdir(parents=True)

    def job(name, stops, **engine):
        cfg = config(base, root / name, ep=2)
        for k, v in engine.items():
            setattr(cfg.parallel if k == "engine" else cfg.deepspeed, k, v)
        validate(cfg)
        return {"name": name, "cfg": to_dict(cfg), "stops": stops}

    ds = dict(engine="deepspeed", stage=1)
    jobs = [job("ref", [None]), job("warm", [("warm_start", 2), None]), job("ppo", [("ppo", 2), None])]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        deepspeed = None
    if deepspeed is not None:
        jobs += [job("ds_ref", [None], **ds), job("ds_ppo", [("ppo", 1), None], **ds)]
    res = W.spawn(run_jobs, 2, root / "spawn", jobs=jobs)
    return {"root": root, "res": res, "deepspeed": deepspeed is not None}


@pytest.mark.parametrize("name", ["warm", "ppo"])
def test_two_ranks_ep2_fsdp_resume_is_bit_identical(two_ranks, name):
    assert two_ranks["res"][0][name] == two_ranks["res"][1][name] == ["preempted", "finished"]
    root = two_ranks["root"]
    assert_allocators_only(complete_checkpoints(root / name)[0])
    assert_same_run(root / name, root / "ref")


def test_two_ranks_deepspeed_zero1_resume_is_bit_identical(two_ranks):
    if not two_ranks["deepspeed"]:
        pytest.skip("DeepSpeed is not installed (pip install 'moe_train[deepspeed]')")
    root = two_ranks["root"]
    assert two_ranks["res"][0]["ds_ppo"] == ["preempted", "finished"]
    first = complete_checkpoints(root / "ds_ppo")[0]
    # DeepSpeed's module file (exclude_frozen_parameters) and ZeRO partitions: the allocators only
    module = torch.load(next((first / "deepspeed").glob("*model_states.pt")), weights_only=False)["module"]
    assert sorted(module) == [f"layers.{i}.{A.ALLOCATOR}" for i in range(2)]
    assert_same_run(root / "ds_ppo", root / "ds_ref")
