"""A checkpoint written before a config key existed resumes when the key keeps its default, and only then."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_train.config import Config, apply_overrides
from moe_train.train.fingerprint import ResumeConfigMismatch, check_resume, config_record

CTX = SimpleNamespace(world_size=1, ep_size=1)


def _checkpoint_without(tmp_path, cfg: Config, section: str, key: str):
    record = config_record(cfg, CTX)
    holder = record["model"]["moe"] if section == "model.moe" else record[section]
    del holder[key]
    torch.save({"config": record}, tmp_path / "trainer.pt")
    return tmp_path


def test_a_key_added_after_the_checkpoint_counts_as_its_default(tmp_path):
    cfg = Config()
    path = _checkpoint_without(tmp_path, cfg, "model.moe", "null_kind")
    assert check_resume(path, cfg, CTX) == {}  # the default now: nothing changed
    changed = apply_overrides(cfg, ['model.moe.router="null_experts"', "model.moe.num_null_experts=8",
                                    "model.moe.null_kind=identity"])
    with pytest.raises(ResumeConfigMismatch, match=r"model\.moe\.null_kind: 'zero' in the checkpoint, 'identity' now"):
        check_resume(_checkpoint_without(tmp_path, changed, "model.moe", "null_kind"), changed, CTX)


def test_a_data_key_added_after_the_checkpoint_counts_as_its_default(tmp_path):
    cfg = Config()
    assert check_resume(_checkpoint_without(tmp_path, cfg, "data", "corpus"), cfg, CTX) == {}
