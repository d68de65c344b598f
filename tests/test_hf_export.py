"""Hugging Face exports run the trained model: every family x router kind the export supports loads in transformers
(natively, or with trust_remote_code=True where the folder carries its own modeling code, io/hf_remote), its
logits equal ours (fp32, 1e-4) and generate() continues a prompt as our model does; from_hf reads the folder back
exactly; loaders that cannot run an export faithfully refuse it; `moe-train export` writes one from a model.pt or
a DCP checkpoint.

Covered (family: routers): mixtral: topk, null zero / identity / constant, Ada-K, Ada-K over identity nulls, top-p;
qwen2_moe: topk, topk + nonzero expert bias, null zero / constant, Ada-K, top-p; qwen3_moe: topk, null identity (torch.topk
ties), Ada-K, top-p; deepseek_v2: topk, null zero (group-limited), Ada-K, top-p; deepseek_v3: topk (noaux_tc groups,
correction bias), null zero (budget bias), Ada-K (top-p needs softmax scores, which a deepseek_v3 checkpoint cannot
express); longcat_flash: topk, identity nulls (both native).
"""

import json
import logging
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.io.hf import from_hf, to_hf  # noqa: E402
from moe_train.io.hf_remote import AUTO_MAP, FILES, REMOTE_MODEL_TYPE  # noqa: E402
from moe_train.model import build_model  # noqa: E402

TOL = 1e-4
VOCAB = 61
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def randomize(model, seed, std=0.15):
    """Weights big enough that routing (gates, null gates, allocators) and every norm visibly matter; selection
    biases random too, so a loader that drops one routes differently."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "bias" in name and p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith(("expert_bias", "null_bias")) and b.is_floating_point():
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


DEEPSEEK = dict(num_heads=4, num_kv_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
                first_k_dense_replace=1, dense_intermediate_size=20, n_shared_experts=1, rope_interleave=True)
V3 = dict(score_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, use_expert_bias=True,
          routed_scaling_factor=2.5)
V2 = dict(norm_topk_prob=False, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5)
LONGCAT = dict(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, num_heads=3,
               num_kv_heads=3, dense_intermediate_size=20)


def null(**kw):
    return MoEConfig(**{**dict(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, baseline_top_k=2), **kw})


def adak(**kw):
    return MoEConfig(**{**dict(router="adak", num_experts=4, top_k=2, k_min=0, k_max=3), **kw})


def top_p(**kw):
    return MoEConfig(**{**dict(router="top_p", num_experts=4, top_p=0.6), **kw})


# id -> (family, native?, model kwargs)
CASES = {
    "mixtral-topk": ("mixtral", True, dict(moe=MoEConfig(num_experts=4, top_k=2))),
    "mixtral-null-zero": ("mixtral", False, dict(moe=null())),
    "mixtral-null-identity": ("mixtral", False, dict(moe=null(null_kind="identity", num_null_experts=2))),
    "mixtral-null-constant": ("mixtral", False, dict(moe=null(null_kind="constant"), tie_word_embeddings=True)),
    "mixtral-adak": ("mixtral", False, dict(moe=adak())),
    "mixtral-adak-identity-nulls": ("mixtral", False, dict(moe=adak(num_null_experts=4, null_kind="identity", k_max=4,
                                                                    top_k=3))),
    "mixtral-top_p": ("mixtral", False, dict(moe=top_p(norm_topk_prob=True))),
    "qwen2_moe-topk": ("qwen2_moe", True, dict(moe=MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False))),
    "qwen2_moe-topk-expert-bias": ("qwen2_moe", False, dict(moe=MoEConfig(num_experts=4, top_k=2,
                                                                          expert_bias_rate=1e-3))),
    "qwen2_moe-null-zero": ("qwen2_moe", False, dict(moe=null(norm_topk_prob=False, target_true_experts=1.5))),
    "qwen2_moe-null-constant": ("qwen2_moe", False, dict(moe=null(null_kind="constant", norm_topk_prob=False),
                                                         shared_expert_intermediate_size=0)),
    "qwen2_moe-adak": ("qwen2_moe", False, dict(moe=adak(norm_topk_prob=False))),
    "qwen2_moe-top_p": ("qwen2_moe", False, dict(moe=top_p())),
    "qwen3_moe-topk": ("qwen3_moe", True, dict(moe=MoEConfig(num_experts=4, top_k=2))),
    "qwen3_moe-null-identity": ("qwen3_moe", False, dict(moe=null(null_kind="identity", norm_topk_prob=False,
                                                                  null_tie_break="topk"))),
    "qwen3_moe-adak": ("qwen3_moe", False, dict(moe=adak())),
    "qwen3_moe-top_p": ("qwen3_moe", False, dict(moe=top_p(norm_topk_prob=True), attention_bias=True)),
    "deepseek_v2-topk": ("deepseek_v2", True, dict(moe=MoEConfig(num_experts=4, top_k=2, **V2), **DEEPSEEK)),
    "deepseek_v2-null-zero": ("deepseek_v2", False, dict(moe=null(**V2), **DEEPSEEK)),
    "deepseek_v2-adak": ("deepseek_v2", False, dict(moe=adak(norm_topk_prob=False), q_lora_rank=12, **DEEPSEEK)),
    "deepseek_v2-top_p": ("deepseek_v2", False, dict(moe=top_p(norm_topk_prob=False), **DEEPSEEK)),
    "deepseek_v3-topk": ("deepseek_v3", True, dict(moe=MoEConfig(num_experts=4, top_k=2, **V3), q_lora_rank=12,
                                                   **DEEPSEEK)),
    "deepseek_v3-null-zero": ("deepseek_v3", False, dict(moe=null(**V3, target_true_experts=1.5), **DEEPSEEK)),
    "deepseek_v3-adak": ("deepseek_v3", False, dict(moe=adak(**{**V3, "topk_group": 2}), **DEEPSEEK)),
    "longcat_flash-topk": ("longcat_flash", True, dict(moe=MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False,
                                                                     use_expert_bias=True), **LONGCAT)),
    "longcat_flash-null-identity": ("longcat_flash", True, dict(moe=null(null_kind="identity", norm_topk_prob=False,
                                                                         routed_scaling_factor=2.0,
                                                                         use_expert_bias=True), **LONGCAT)),
}


def our_model(family, seed=0, **kw):
    base = dict(family=family, vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                num_kv_heads=2, rope_theta=300.0, max_seq_len=64)
    if family == "qwen2_moe":
        base.update(attention_bias=True, shared_expert_intermediate_size=16)
    base.update(kw)
    torch.manual_seed(seed)
    return randomize(build_model(ModelConfig(**base)), seed).eval()


def load(path, remote):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=remote, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.config._experts_implementation = "eager"  # transformers' per-expert loop (any expert width)
    return model.eval()


@torch.no_grad()
def greedy(model, ids, n):
    """Our model's greedy continuation (the whole sequence each step)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_in_transformers_as_in_moe_train(tmp_path, case, caplog):
    family, native, kw = CASES[case]
    model = our_model(family, seed=len(case), **kw)
    with torch.no_grad():
        want = model(IDS)
    with caplog.at_level(logging.INFO, logger="moe_train.io.hf"):
        out = to_hf(model, tmp_path / "export")
    hf = json.loads((out / "config.json").read_text())
    assert (out / "generation_config.json").is_file()
    said = " ".join(r.getMessage() for r in caplog.records)
    if native:  # the family's own layout and classes, nothing shipped
        assert hf["model_type"] == family and "auto_map" not in hf
        assert not any((out / f).exists() for f in FILES)
        assert "natively" in said
    else:
        assert hf["model_type"] == REMOTE_MODEL_TYPE and hf["auto_map"] == AUTO_MAP
        assert all((out / f).is_file() for f in FILES)
        assert "trust_remote_code=True" in said
        with pytest.raises(ValueError, match="trust_remote_code"):  # never silently the plain top-k model
            transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = load(out, remote=not native)
    with torch.no_grad():
        got = ref(IDS).logits
    assert want.std() > 0.1
    assert (got - want).abs().max().item() <= TOL, case
    prompt = IDS[:, :5]
    gen = ref.generate(prompt, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(gen, greedy(model, prompt, 3)), case
    back = from_hf(out)  # moe_train reads either kind of export back exactly
    assert back.config == model.config
    for (n, a), (_, b) in zip(back.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_remote_code_handles_left_padding_in_generate(tmp_path):
    """A padded batch generates per row what the row alone generates (the shipped code masks padding and counts
    positions from the first real token, as transformers' models do)."""
    model = our_model("mixtral", seed=3, moe=null())
    ref = load(to_hf(model, tmp_path / "export"), remote=True)
    short = IDS[1:, :3]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    alone = ref.generate(short, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(short))
    both = ref.generate(torch.cat([IDS[:1, :5], padded]), max_new_tokens=3, do_sample=False,
                        attention_mask=torch.cat([torch.ones(1, 5, dtype=torch.long), mask]), pad_token_id=0)
    assert torch.equal(both[1, 2:], alone[0])


def test_remote_export_replaced_by_a_native_one_leaves_no_code(tmp_path):
    to_hf(our_model("mixtral", moe=null()), tmp_path / "export")
    assert (tmp_path / "export" / FILES[1]).is_file()
    to_hf(our_model("mixtral", moe=MoEConfig(num_experts=4, top_k=2)), tmp_path / "export")
    assert not any((tmp_path / "export" / f).exists() for f in FILES)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "mixtral"


def test_tokenizer_and_generation_config_are_carried(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "bos_token_id": 1}))
    out = to_hf(our_model("mixtral", moe=adak()), tmp_path / "export", carry_from=[src])
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3


def test_cli_exports_a_model_pt(tmp_path):
    from moe_train.cli import main
    from moe_train.io.model_file import save_model

    model = our_model("qwen3_moe", seed=5, moe=adak())
    path = save_model(model, tmp_path / "run" / "final" / "model.pt")
    assert main(["export", "--checkpoint", str(path), "--dst", str(tmp_path / "hf")]) == 0
    assert main(["export", "--checkpoint", str(path), "--dst", str(tmp_path / "hf")]) == 2  # exists: refused
    ref = load(tmp_path / "hf", remote=True)
    with torch.no_grad():
        assert (ref(IDS).logits - model(IDS)).abs().max().item() <= TOL


def test_cli_exports_a_dcp_checkpoint_of_a_run(tmp_path):
    """A checkpoint (RUN/checkpoints/step_N) is rebuilt from RUN/config.yaml, loaded in one process and exported:
    the same model as the run's final model.pt of that step."""
    from moe_train.cli import main
    from moe_train.config import Config, DataConfig, TrainConfig
    from moe_train.io.model_file import load_model
    from moe_train.train.trainer import train

    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=2, expert_bias_rate=0.01)
    run = tmp_path / "run"
    train(Config(model=ModelConfig(hidden_size=32, intermediate_size=32, max_seq_len=64, moe=moe),
                 train=TrainConfig(steps=2, batch_size=4, seq_len=16, warmup_steps=1, log_every=100, out_dir=str(run),
                                   checkpoint_every=2, tensorboard=False),
                 data=DataConfig(num_sequences=16, val_sequences=4)))
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    assert main(["export", "--checkpoint", str(ckpt), "--dst", str(tmp_path / "hf")]) == 0
    final = load_model(run / "final" / "model.pt").eval()
    ids = IDS % final.config.vocab_size
    ref = load(tmp_path / "hf", remote=True)
    with torch.no_grad():
        assert (ref(ids).logits - final(ids)).abs().max().item() <= TOL
    back = from_hf(tmp_path / "hf")
    for (n, a), (_, b) in zip(back.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), n
