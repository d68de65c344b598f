"""AdaMoE conversion: null gates = the true gates repeated m/n times, experts untouched, config updated, and
every bad argument rejected before any work. Source tensors are read straight from the files (safetensors),
not through from_hf, so the checks do not rest on the code under test."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.io.convert import add_null_experts, convert_to_adamoe  # noqa: E402
from moe_train.io.hf import from_hf  # noqa: E402
from moe_train.model import build_model  # noqa: E402
from moe_train.routing import NullExpertRouter  # noqa: E402

IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def save_hf(path, family, dtype=torch.float32, **kw):
    """A tiny random transformers model saved with save_pretrained (+ a tokenizer file to carry along)."""
    torch.manual_seed(0)
    base = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **base, **kw))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            moe_intermediate_size=24, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            **base, **kw))
    for p in model.parameters():
        p.normal_(0, 0.2)
    model.config._attn_implementation = "eager"
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"toy": true}')
    return model


def files(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family,m,k,baseline", [("mixtral", 8, 4, None), ("qwen2_moe", 4, 3, 1)])
def test_convert_to_adamoe(tmp_path, family, m, k, baseline):
    ref = save_hf(tmp_path / "src", family)
    # Qwen keeps raw probabilities (norm_topk_prob false): only the authors' tie rule converts it (not
    # function-preserving); Mixtral n=4, m=8, k=4 starts at ceil(4/3) = 2 true experts, its own top-2
    tie_break = "true_first" if family == "mixtral" else "topk"
    out = convert_to_adamoe(tmp_path / "src", tmp_path / "dst", num_null_experts=m, top_k=k,
                            baseline_top_k=baseline, null_tie_break=tie_break)
    assert out == (tmp_path / "dst").absolute()
    src, dst = files(tmp_path / "src"), files(tmp_path / "dst")
    prefix = "block_sparse_moe." if family == "mixtral" else "mlp."
    for i in range(2):
        gate = src[f"model.layers.{i}.{prefix}gate.weight"]
        null = dst[f"model.layers.{i}.{prefix}null_gate.weight"]
        assert null.shape == (m, 32)
        for j in range(m):  # null expert j is the twin of true expert j mod n
            assert torch.equal(null[j], gate[j % 4])
    # every tensor of the source (experts, attention, true gates, norms) is carried over bit for bit
    assert set(src) <= set(dst)
    for name, t in src.items():
        assert torch.equal(dst[name], t), name
    hf = json.loads((tmp_path / "dst" / "config.json").read_text())
    want_baseline = 2 if baseline is None else baseline
    assert hf["moe_train"]["router"] == "null_experts"
    assert (hf["moe_train"]["num_null_experts"], hf["moe_train"]["top_k"]) == (m, k)
    assert hf["moe_train"]["baseline_top_k"] == want_baseline
    assert hf["moe_train"]["null_tie_break"] == tie_break
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 2)
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"toy": true}'

    model = from_hf(tmp_path / "dst")
    assert model.config.moe.router == "null_experts" and model.config.moe.top_k == k
    assert model.config.moe.num_null_experts == m and model.config.moe.resolved_baseline_top_k == want_baseline
    assert all(isinstance(r, NullExpertRouter) for r in model.routers())
    logits, plans = model.eval()(IDS, return_plans=True)
    assert torch.isfinite(logits).all()
    for p in plans:  # null picks are -1 slots: variable true experts per token, at most k
        assert p.expert_idx_TK.shape[1] == k and (p.true_experts_per_token_T <= k).all()
    # transformers runs the converted router itself (the export ships its modeling code, io/hf_remote)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    assert back.config.num_experts_per_tok == want_baseline
    with torch.no_grad():
        assert (back(IDS).logits - logits).abs().max().item() <= 1e-4
        if baseline is None:  # Mixtral's true_first conversion is function-preserving: the source's logits
            assert (back(IDS).logits - ref(IDS).logits).abs().max().item() <= 1e-4


def test_conversion_keeps_bf16_and_works_in_place(tmp_path):
    save_hf(tmp_path / "m", "mixtral", dtype=torch.bfloat16)
    src = files(tmp_path / "m")
    convert_to_adamoe(tmp_path / "m", tmp_path / "m", num_null_experts=4, top_k=3)
    dst = files(tmp_path / "m")
    assert dst["model.layers.0.block_sparse_moe.null_gate.weight"].dtype == torch.bfloat16
    assert torch.equal(dst["model.layers.0.block_sparse_moe.null_gate.weight"],
                       src["model.layers.0.block_sparse_moe.gate.weight"])
    assert all(torch.equal(dst[n], t) for n, t in src.items())
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_add_null_experts_in_memory_keeps_true_weights():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                      num_kv_heads=2, moe=MoEConfig(num_experts=4, top_k=2, expert_bias_rate=1e-3))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for r in model.routers():
            r.expert_bias.normal_()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    gates = [r.gate.weight.detach().clone() for r in model.routers()]
    biases = [r.expert_bias.clone() for r in model.routers()]
    assert add_null_experts(model, 8, 5) is model
    assert model.config.moe.router == "null_experts" and model.config.moe.top_k == 5
    assert model.config.moe.num_null_experts == 8 and model.config.moe.baseline_top_k == 2
    assert cfg.moe.router == "topk"  # the caller's config object is not mutated
    for r, g, b in zip(model.routers(), gates, biases):
        assert torch.equal(r.gate.weight, g) and torch.equal(r.expert_bias, b)
        assert torch.equal(r.null_gate.weight, torch.cat([g, g]))
        assert r.gate.weight.requires_grad and r.null_gate.weight.requires_grad
    after = model.state_dict()
    for n, t in before.items():
        if ".router." not in n:
            assert torch.equal(after[n], t), n
    model(IDS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_null_experts=6, top_k=4), "num_null_experts=6 must be a multiple of the 4 true experts"),
    (dict(num_null_experts=0, top_k=2), "num_null_experts=0 must be an integer >= 1"),
    (dict(num_null_experts=4, top_k=9), "top_k=9 must be an integer in \\[1, 8\\]"),
    (dict(num_null_experts=4, top_k=0), "top_k=0"),
    (dict(num_null_experts=4, top_k=2, baseline_top_k=5), "baseline_top_k=5 must be an integer in \\[1, 4\\]"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, match):
    save_hf(tmp_path / "src", "mixtral")
    with pytest.raises(ValueError, match=match):
        convert_to_adamoe(tmp_path / "src", tmp_path / "dst", **kwargs)
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_only_top_k_models_convert(tmp_path):
    save_hf(tmp_path / "src", "mixtral")
    convert_to_adamoe(tmp_path / "src", tmp_path / "once", num_null_experts=4, top_k=3)
    with pytest.raises(ValueError, match="router is 'null_experts' with 4 null experts already"):
        convert_to_adamoe(tmp_path / "once", tmp_path / "twice", num_null_experts=4, top_k=3)
    adak = build_model(ModelConfig(moe=MoEConfig(router="adak", num_experts=4, top_k=2)))
    with pytest.raises(ValueError, match="router is 'adak'"):
        add_null_experts(adak, 4, 3)
    with pytest.raises(ValueError, match="does not exist"):
        convert_to_adamoe(tmp_path / "missing", tmp_path / "x", num_null_experts=4, top_k=3)
