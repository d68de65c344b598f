"""Config loading and validation: every user mistake names the key, the value and what is allowed."""

import textwrap

import pytest

from moe_train.config import Config, ConfigError, ModelConfig, MoEConfig, load_config, validate, validate_model


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_configs_load():
    for name in ("tiny_top2", "tiny_adamoe"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.moe.num_experts == 8


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train: {steps: 5}\n"), ["train.lr=0.5", "model.moe.top_k=3"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.moe.top_k) == (5, 0.5, 3)
    # YAML 1.1 reads 1e-3 (no dot) as a string; float keys take it as the number it is
    cfg = load_config(write(tmp_path, "train: {lr: 1e-3}\n"), ["model.moe.aux_loss_coef=2e-2"])
    assert (cfg.train.lr, cfg.model.moe.aux_loss_coef) == (1e-3, 2e-2)
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "train: {lr: fast}\n"))


@pytest.mark.parametrize("text, needles", [
    ("model: {hiden_size: 8}", ["model.hiden_size", "unknown key", "hidden_size"]),
    ("trian: {steps: 1}", ["trian", "unknown key"]),
    ("model: {hidden_size: 60, num_heads: 7}", ["model.hidden_size", "60", "num_heads=7"]),
    ("model: {num_heads: 4, num_kv_heads: 3}", ["model.num_kv_heads", "3"]),
    ("model: {moe: {top_k: 9}}", ["model.moe.top_k", "9", "[1, 8]"]),
    ("model: {moe: {router: null_experts, num_null_experts: 4, top_k: 13}}", ["model.moe.top_k", "13", "[1, 12]"]),
    ("model: {moe: {router: topk, num_null_experts: 4}}", ["model.moe.num_null_experts", "router: null"]),
    ("model: {moe: {capacity_factor: -1.0}}", ["model.moe.capacity_factor", "-1.0", "> 0"]),
    ("model: {moe: {router: adak, k_min: 3, k_max: 2}}", ["model.moe.k_min", "k_max=2"]),
    ("model: {moe: {router: adak, k_max: 9}}", ["model.moe.k_max", "9"]),
    ("model: {moe: {router: magic}}", ["model.moe.router", "magic", "topk"]),
    ("model: {moe: {router: null}}", ["model.moe.router", "quote it"]),
    ("model: {moe: {drop_policy: random}}", ["model.moe.drop_policy", "random"]),
    ("model: {moe: {aux_loss_coef: -0.1}}", ["model.moe.aux_loss_coef"]),
    ("model: {family: llama}", ["model.family", "llama", "mixtral"]),
    ("model: {hidden_size: eight}", ["model.hidden_size", "integer"]),
    ("train: {steps: 0}", ["train.steps", ">= 1"]),
    ("train: {seq_len: 1024}", ["train.seq_len", "max_seq_len"]),
    ("train: {schedule: linear}", ["train.schedule", "linear"]),
    ("parallel: {ep: 3}", ["parallel.ep", "3", "num_experts=8"]),
    ("data: {kind: web}", ["data.kind", "web"]),
])
def test_config_errors_name_key_value_and_allowed(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        validate_model(ModelConfig(moe=MoEConfig(top_k=0)))


def test_defaults_are_valid():
    validate(Config())
