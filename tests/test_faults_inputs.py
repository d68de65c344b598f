"""Issue 17, users' mistakes: a representative subset of bench/mistakes.py (the campaign behind docs/mistakes.md),
each through the real command line in a subprocess, must be refused clearly and early: exit 2, one line naming the
key or file, no traceback, before any process group or model. Plus the checks' units, in process."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from moe_train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mistakes_campaign", ROOT / "bench" / "mistakes.py")
campaign = importlib.util.module_from_spec(_spec)
sys.modules["mistakes_campaign"] = campaign  # dataclasses look their module up there
_spec.loader.exec_module(campaign)

# one of each kind: config, data, checkpoints / HF folders, command line, launch
SUBSET = ["C02", "C03", "C04", "C10", "C23", "D03", "D05", "D06", "D10", "K07", "K09", "K14", "L01", "L05", "L07",
          "P06"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return campaign.prepare(tmp_path_factory.mktemp("mistakes"))


@pytest.mark.parametrize("mid", SUBSET)
def test_user_mistake_is_refused_clearly_and_early(env, mid):
    m = next(m for m in campaign.mistakes(env) if m.id == mid)
    r = campaign.run_one(m, env)
    assert r["class"] == "clear-and-early", (mid, m.what, r["rc"], r["message"], r["stderr_tail"])


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_config_file_mistakes_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write(tmp_path, "e.yaml", "# nothing\n"))
    assert load_config(write(tmp_path, "d.yaml", "{}\n")).train.steps == 100  # defaults on purpose
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(write(tmp_path, "s.yaml", "train:\n  steps: [1\n"))
    for text, key in [("train: {lr: .inf}", "train.lr"), ("model: {rope_theta: .nan}", "model.rope_theta"),
                      ("adak: {penalty: .inf}", "adak.penalty"), ("train: {beta2: 1.5}", "train.beta2")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(write(tmp_path, "f.yaml", text + "\n"))


def test_data_preflight_reads_every_record_of_a_small_file(tmp_path):
    from moe_train.config import Config, DataConfig, TrainConfig
    from moe_train.data.preflight import preflight_data

    rows = [{"tokens": list(range(20))}] * 10 + [{"tokens": [1, 2.5]}]
    f = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(train=TrainConfig(seq_len=8), data=DataConfig(kind="files", path=str(f), token_field="tokens",
                                                                val_sequences=0))
    with pytest.raises(ValueError, match=r"t\.jsonl line 11: field 'tokens' holds 2\.5"):
        preflight_data(cfg, 64)
    write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:10]))
    preflight_data(cfg, 64)
    with pytest.raises(ValueError, match="token id 16 is outside"):
        preflight_data(cfg, 16)


def test_empty_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    from moe_train.io.dcp_checkpoint import MANIFEST, latest_checkpoint

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / MANIFEST).write_text("{}")
    (root / "latest").write_text("")
    assert latest_checkpoint(tmp_path).name == "step_00000003"
