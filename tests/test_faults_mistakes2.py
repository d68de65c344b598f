"""Faults and mistakes, second round: eval's wrong numbers, Hugging Face folders that lie, DeepSpeed JSON mistakes and
world sizes FSDP2 cannot shard. Units in process (fast); a few entries of bench/mistakes.py through the real command
line, which must be refused clearly and early (exit 2, one line naming the key or file, no traceback)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from moe_train.config import Config, ConfigError, DeepSpeedConfig, ModelConfig, MoEConfig, TrainConfig, validate
from moe_train.eval.codec import TokenIdCodec
from moe_train.eval.evaluate import EvalConfig, check_eval_config
from moe_train.eval.tasks import check_task_fits, load_task
from moe_train.io.hf_config import config_from_hf, config_to_hf
from moe_train.io.safetensors_folder import SafetensorsHeaders
from moe_train.parallel.layout import fsdp_dim1_widths, validate_fsdp_config, validate_fsdp_sharding

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mistakes_campaign2", ROOT / "bench" / "mistakes.py")
campaign = importlib.util.module_from_spec(_spec)
sys.modules["mistakes_campaign2"] = campaign  # dataclasses look their module up there
_spec.loader.exec_module(campaign)

# one of each class of this round: eval, HF folder, DeepSpeed JSON, world size
SUBSET = ["E03", "E05", "H01", "H05", "S01", "W01"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return campaign.prepare(tmp_path_factory.mktemp("mistakes2"))


@pytest.mark.parametrize("mid", SUBSET)
def test_second_round_mistake_is_refused_clearly_and_early(env, mid):
    m = next(m for m in campaign.mistakes(env) if m.id == mid)
    r = campaign.run_one(m, env)
    assert r["class"] == "clear-and-early", (mid, m.what, r["rc"], r["message"], r["stderr_tail"])


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---- eval ------------------------------------------------------------------------------------------------------


def test_task_files_are_refused_by_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"e\.jsonl line 2: 'text' must be non-empty"):
        load_task(write(tmp_path, "e.jsonl", '{"text": "1 2"}\n{"text": ""}\n'))
    with pytest.raises(ValueError, match=r"a\.jsonl line 1: expected one JSON object per line, got a list"):
        load_task(write(tmp_path, "a.jsonl", '[{"text": "1 2"}]\n'))
    with pytest.raises(ValueError, match="is a directory"):
        load_task(tmp_path)
    with pytest.raises(ValueError, match="not a regular file"):
        load_task("/dev/zero")
    os.mkfifo(tmp_path / "f.jsonl")
    with pytest.raises(ValueError, match="not a regular file"):
        load_task(tmp_path / "f.jsonl")  # would block forever if opened
    with pytest.raises(ValueError, match=r"m\.jsonl line 1: gold=True"):
        load_task(write(tmp_path, "m.jsonl", '{"context": "1", "choices": ["2"], "gold": true}\n'))


def test_a_context_longer_than_the_model_is_refused_naming_the_limit(tmp_path):
    ctx = " ".join(str(i % 64) for i in range(400))
    kind, docs = load_task(write(tmp_path, "l.jsonl", json.dumps({"context": ctx, "choices": ["1"], "gold": 0})))
    with pytest.raises(ValueError, match=r"l\.jsonl document 1: context \+ choice 0 is 401 tokens.*max_seq_len=64"):
        check_task_fits("l.jsonl", kind, docs, TokenIdCodec(64), 64)
    check_task_fits("l.jsonl", kind, docs, TokenIdCodec(64), 400)
    kind, docs = load_task(write(tmp_path, "p.jsonl", json.dumps({"text": ctx})))
    check_task_fits("p.jsonl", kind, docs, TokenIdCodec(64), 64)  # perplexity: rolling windows, any length


def test_eval_arguments_are_checked_before_the_model_is_loaded(tmp_path):
    ok = dict(checkpoint=str(tmp_path / "never_read.pt"))
    for change, match in [({"corpus_sequences": 0}, "--corpus-sequences"), ({"batch_size": -1}, "--batch-size"),
                          ({"device": "gpu0"}, "--device"), ({"out": str(tmp_path)}, "--out .* is a directory"),
                          ({"out": write(tmp_path, "f", "") + "/r.json"}, "--out .* is a file, not a folder")]:
        with pytest.raises(ValueError, match=match):
            check_eval_config(EvalConfig(**ok, **change))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            check_eval_config(EvalConfig(**ok, device="cuda"))
    assert check_eval_config(EvalConfig(**ok, out=str(tmp_path / "new" / "r.json")))[0].type == "cpu"


# ---- Hugging Face folders --------------------------------------------------------------------------------------


def _hf_config(**changes):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                      max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2))
    hf = config_to_hf(cfg, torch.float32)
    hf.update(changes)
    return hf


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": "32"}, r"c\.json: hidden_size='32' must be an integer"),
    ({"num_attention_heads": "4"}, r"num_attention_heads='4' must be an integer"),
    ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps='1e-5' must be a number"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' must be true or false"),
    ({"quantization_config": {"quant_method": "fp8"}}, r"quantization_config \(quant_method 'fp8'\)"),
    ({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"model_type": "deepseek_v3", "num_attention_heads": "4", "num_key_value_heads": 4},
     r"num_attention_heads='4' must be an integer"),
])
def test_hf_config_fields_are_type_checked_and_quantization_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf_config(**changes), "c.json")


def _safetensors(tmp_path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_quantized_tensors_and_corrupt_headers_are_refused_at_header_time(tmp_path):
    for name, tensors, match in [
        ("i8", {"w": torch.zeros(2, 2, dtype=torch.int8)}, r"tensor 'w' is stored as I8 \(int8\)"),
        ("f8", {"w": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, r"stored as F8_E4M3 \(float8_e4m3fn\)"),
        ("scale", {"a.weight": torch.zeros(2), "a.weight_scale_inv": torch.ones(1)},
         "'a.weight_scale_inv' is a quantization scale"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(ValueError, match=match):
            SafetensorsHeaders(_safetensors(folder, tensors))
    folder = tmp_path / "bad"
    folder.mkdir()
    f = _safetensors(folder, {"w": torch.zeros(2)}) / "model.safetensors"
    f.write_bytes(f.read_bytes().replace(b'"F32"', b'"Q32"'))
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors file .*unknown dtype"):
        SafetensorsHeaders(folder)


# ---- the DeepSpeed JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds, match", [
    ({"zero_optimisation": {"stage": 3}}, r"unknown key 'zero_optimisation'.*did you mean zero_optimization\?"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, r"'zero_optimization.overlap_com'.*overlap_comm"),
    ({"moe": {"enabled": True}}, r"'moe' is not supported here.*parallel.ep"),
    ({"zero_optimization": {"stage": 2.5}}, r"zero_optimization.stage=2.5 must be an integer"),
    ({"zero_optimization": {"stage": "two"}}, r"ds\.json.*zero_optimization.stage='two' must be an integer"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     r"zero_optimization.offload_optimizer is not supported here"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "yes"}}, r"overlap_comm='yes' must be true or false or null"),
    ({"steps_per_print": "10"}, r"steps_per_print='10' must be an integer"),
    ({"bfloat16": {"enabled": True}}, r"sets \['bfloat16'\]"),
])
def test_deepspeed_json_mistakes_are_refused_naming_key_and_file(tmp_path, ds, match):
    cfg = Config(deepspeed=DeepSpeedConfig(config=write(tmp_path, "ds.json", json.dumps(ds))))
    cfg.parallel.engine = "deepspeed"
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_deepspeed_json_that_deepspeed_reads_passes(tmp_path):
    ds = {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 5e8,
                                "stage3_prefetch_bucket_size": 1000},
          "steps_per_print": 10, "wall_clock_breakdown": False, "communication_data_type": None,
          "activation_checkpointing": {"partition_activations": False}}
    cfg = Config(deepspeed=DeepSpeedConfig(config=write(tmp_path, "ds.json", json.dumps(ds))))
    cfg.parallel.engine = "deepspeed"
    validate(cfg)


# ---- world sizes -----------------------------------------------------------------------------------------------


def test_fsdp_dim1_widths_must_divide_the_expert_data_parallel_size():
    model = ModelConfig(hidden_size=32, intermediate_size=48)
    widths = fsdp_dim1_widths(model, TrainConfig())
    for world, ep in [(1, 1), (8, 1), (16, 1), (4, 4), (8, 2)]:
        validate_fsdp_sharding(world, ep, widths)
    with pytest.raises(ValueError, match=r"model.hidden_size=32 is not divisible by the 3 .*WORLD_SIZE in "
                                         r"\[1, 2, 4, 8, 16\]"):
        validate_fsdp_sharding(3, 1, widths)
    with pytest.raises(ValueError, match=r"model.hidden_size=32 .* 3 expert-data-parallel ranks \(WORLD_SIZE=6 / "
                                         r"parallel.ep=2\).*\[2, 4, 8, 16, 32\]"):
        validate_fsdp_sharding(6, 2, widths)
    with pytest.raises(ValueError, match=r"train.lora_rank=3"):
        validate_fsdp_sharding(2, 1, fsdp_dim1_widths(model, TrainConfig(lora_rank=3)))
    validate_fsdp_sharding(2, 1, fsdp_dim1_widths(model, TrainConfig(lora_rank=3, lora_targets=["attention"])))
    cfg = Config(model=model)
    with pytest.raises(ValueError, match=r"^the miniature: model.hidden_size=32"):
        validate_fsdp_config(cfg, 3, what="the miniature: ")
    cfg.parallel.engine = "deepspeed"  # ZeRO flattens and pads: no rule
    validate_fsdp_config(cfg, 3)
