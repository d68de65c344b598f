"""A resume under another engine than the one that wrote the checkpoint (train/fingerprint.py check_engine) is
refused naming the engine, before any load: DeepSpeed -> FSDP used to blame deepspeed.stage and, with that allowed,
end in DCP's missing-.metadata traceback; FSDP -> DeepSpeed likewise. No spawn: check_resume reads trainer.pt only."""

from __future__ import annotations

import pytest
import torch

from moe_train.config import Config, DeepSpeedConfig
from moe_train.parallel.distributed import ParallelContext
from moe_train.train.fingerprint import ResumeConfigMismatch, check_resume, checkpoint_engine, config_record


def _checkpoint(folder, cfg: Config, deepspeed_stage=None):
    """A checkpoint folder's trainer.pt as each engine writes it (DeepSpeed adds engine, stage and deepspeed/)."""
    folder.mkdir(parents=True)
    state = {"step": 2, "config": config_record(cfg, ParallelContext())}
    if deepspeed_stage is not None:
        state.update(engine="deepspeed", stage=deepspeed_stage)
        (folder / "deepspeed").mkdir()
    torch.save(state, folder / "trainer.pt")
    return folder


def _cfg(engine: str, stage=None) -> Config:
    cfg = Config()
    cfg.parallel.engine = engine
    cfg.deepspeed = DeepSpeedConfig(stage=stage)
    return cfg


def test_deepspeed_checkpoint_under_fsdp_names_the_engine(tmp_path):
    ckpt = _checkpoint(tmp_path / "step_00000002", _cfg("deepspeed", 3), deepspeed_stage=3)
    assert checkpoint_engine(ckpt) == "deepspeed"
    now = _cfg("fsdp")
    now.train.resume_allow_changes = ["*"]  # cannot help: the formats differ
    with pytest.raises(ResumeConfigMismatch, match=r"written by parallel.engine: deepspeed and this launch uses "
                       r"parallel.engine: fsdp.*--set parallel.engine=deepspeed --set deepspeed.stage=3") as e:
        check_resume(ckpt, now, ParallelContext())
    assert "deepspeed.stage:" not in str(e.value)  # not blamed on a side key
    check_resume(ckpt, _cfg("deepspeed", 3), ParallelContext())  # the same engine resumes


def test_fsdp_checkpoint_under_deepspeed_names_the_engine(tmp_path):
    ckpt = _checkpoint(tmp_path / "step_00000002", _cfg("fsdp"))
    assert checkpoint_engine(ckpt) == "fsdp"
    with pytest.raises(ResumeConfigMismatch, match=r"written by parallel.engine: fsdp and this launch uses "
                       r"parallel.engine: deepspeed.*DCP checkpoint.*--set parallel.engine=fsdp.*moe-train export"):
        check_resume(ckpt, _cfg("deepspeed", 2), ParallelContext())
    check_resume(ckpt, _cfg("fsdp"), ParallelContext())
