"""The engine interface (train/engine.py) and its registry (train/engine_registry.py): the names agree with the
config's, every engine implements the whole interface, and the Trainer reaches its engine only through the
registry (an engine registered under a name is what a run of that name prepares, steps and checkpoints with)."""

import inspect
import json

import pytest

from moe_train.config import ENGINE_FACTS, ENGINES, load_config
from moe_train.train.engine import Engine, TorchEngine
from moe_train.train.engine_registry import ENGINE_CLASSES, engine_class


def test_registry_agrees_with_the_config_names_and_facts():
    assert tuple(ENGINE_CLASSES) == ENGINES == tuple(ENGINE_FACTS)
    for name, cls in ENGINE_CLASSES.items():
        assert issubclass(cls, Engine) and not inspect.isabstract(cls), cls  # the whole interface
        assert cls.name == name and engine_class(name) is cls
        assert cls.facts() is ENGINE_FACTS[name]
        assert isinstance(cls.can_skip_steps, bool) and isinstance(cls.dcp_checkpoints, bool)
    assert ENGINE_FACTS["fsdp"].fsdp2 and not ENGINE_FACTS["deepspeed"].fsdp2


def test_unknown_engine_names_the_key():
    with pytest.raises(ValueError, match=r"parallel.engine='megatron' must be one of \('fsdp', 'deepspeed'\)"):
        engine_class("megatron")


class RecordingEngine(TorchEngine):
    """TorchEngine that notes which interface calls a run makes (the math is TorchEngine's)."""

    calls: list[str] = []

    @classmethod
    def prepare_meta_model(cls, model, ctx, param_dtype):
        cls.calls.append("prepare_meta_model")
        super().prepare_meta_model(model, ctx, param_dtype)

    @classmethod
    def prepare_model(cls, model, ctx, *, built, param_dtype=None):
        cls.calls.append("prepare_model")
        return super().prepare_model(model, ctx, built=built, param_dtype=param_dtype)

    @classmethod
    def split_param_groups(cls, opt):
        cls.calls.append("split_param_groups")
        super().split_param_groups(opt)

    @classmethod
    def create(cls, model, opt, cfg, ctx, **kw):
        cls.calls.append("create")
        return super().create(model, opt, cfg, ctx, **kw)

    def clip_and_step(self, max_norm):
        self.calls.append("clip_and_step")
        return super().clip_and_step(max_norm)

    def save_checkpoint(self, *args, **kw):
        self.calls.append("save_checkpoint")
        return super().save_checkpoint(*args, **kw)

    def close(self):
        self.calls.append("close")


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "val_loss" not in r]


def test_trainer_runs_whatever_engine_the_registry_names(tmp_path, monkeypatch):
    from moe_train.train.trainer import train

    over = ["train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false", "data.num_sequences=64"]
    train(load_config("configs/tiny_top2.yaml", over + [f"train.out_dir={tmp_path / 'plain'}"]))
    monkeypatch.setitem(ENGINE_CLASSES, "fsdp", RecordingEngine)
    monkeypatch.setattr(RecordingEngine, "calls", [])
    train(load_config("configs/tiny_top2.yaml", over + [f"train.out_dir={tmp_path / 'recorded'}"]))
    calls = RecordingEngine.calls
    # one process: no meta-model sharding; the model, groups and engine from the class, then the steps
    assert calls[:3] == ["prepare_model", "split_param_groups", "create"], calls
    assert calls.count("clip_and_step") == 4 and calls.count("save_checkpoint") == 2 and calls[-1] == "close"
    assert _losses(tmp_path / "recorded") == _losses(tmp_path / "plain")  # the same engine math, bit for bit


def test_export_refuses_a_checkpoint_its_engine_does_not_write_as_dcp(tmp_path):
    import yaml

    from moe_train.cli import _load_dcp_model
    from moe_train.config import Config, to_dict

    cfg = Config()
    cfg.parallel.engine = "deepspeed"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"parallel.engine: deepspeed run's checkpoint, not a DCP one; export its "
                                         r"final/model.pt"):
        _load_dcp_model(ckpt)
