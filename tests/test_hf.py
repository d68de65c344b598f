"""Hugging Face interchange against transformers itself: import parity, export loads in transformers, exact
round trips of null-expert / Ada-K models, sharding, atomic writes, and a clear error for every unsupported input.

The reference is transformers 5.x run with attn_implementation="eager" (its plain-matmul attention), fp32.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.io import safetensors_folder  # noqa: E402
from moe_train.io.hf import from_hf, to_hf  # noqa: E402
from moe_train.model import build_model  # noqa: E402

TOL = 1e-4


@torch.no_grad()
def randomize(model, seed, std=0.15):
    """Weights big enough that routing and every norm / bias visibly matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "bias" in name and p.dim() == 1 and "expert_bias" not in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def hf_model(family, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if family == "mixtral":
        base.update(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        base.update(kw)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**base))
    else:
        base.update(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                    num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
        base.update(kw)
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**base))
    model.config._attn_implementation = "eager"
    return randomize(model, seed).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def ours_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def load_in_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


IDS = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(7))

PARITY_CASES = [
    ("mixtral", dict()),  # GQA 4/2, top-2 of 4
    ("mixtral", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=6, num_local_experts=3,
                     num_experts_per_tok=1)),  # MHA, top-1
    ("mixtral", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24, num_local_experts=5,
                     num_experts_per_tok=3, tie_word_embeddings=True, rms_norm_eps=1e-3)),  # head_dim != D/H
    ("qwen2_moe", dict()),  # norm_topk_prob False, shared expert, qkv bias, GQA
    ("qwen2_moe", dict(num_key_value_heads=4, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                       shared_expert_intermediate_size=12)),  # MHA, top-3, renormalised
    ("qwen2_moe", dict(num_experts=3, num_experts_per_tok=1, shared_expert_intermediate_size=0,
                       head_dim=12, tie_word_embeddings=True)),  # no shared expert (zero-width in transformers)
]


@pytest.mark.parametrize("family,kw", PARITY_CASES)
def test_import_matches_transformers_logits(tmp_path, family, kw):
    ref = hf_model(family, seed=len(kw), **kw)
    want = hf_logits(ref, IDS)
    ref.save_pretrained(tmp_path / "ckpt")
    model = from_hf(tmp_path / "ckpt")
    got = ours_logits(model, IDS)
    assert model.config.family == family
    assert model.config.moe.top_k == ref.config.num_experts_per_tok
    assert (got - want).abs().max().item() <= TOL
    assert want.std() > 0.1  # the comparison is not between two near-constant outputs


def test_save_pretrained_writes_published_per_expert_names(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path / "m")
    hf_model("qwen2_moe").save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= names


def test_fused_expert_layout_is_read(tmp_path):
    """A file carrying transformers' in-memory layout (mlp.experts.gate_up_proj / down_proj) imports the same."""
    ref = hf_model("mixtral", seed=3)
    want = hf_logits(ref, IDS)
    ref.save_pretrained(tmp_path / "ckpt")
    fused = {n: p.detach().clone() for n, p in ref.state_dict().items()}  # in-memory names: mlp.experts.gate_up_proj
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in fused)
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    save_file(fused, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    assert (ours_logits(from_hf(tmp_path / "ckpt"), IDS) - want).abs().max().item() <= TOL


def test_sharded_transformers_checkpoint_is_read(tmp_path):
    ref = hf_model("qwen2_moe", seed=5)
    want = hf_logits(ref, IDS)
    ref.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 2
    assert (ours_logits(from_hf(tmp_path / "ckpt"), IDS) - want).abs().max().item() <= TOL


def our_model(family="mixtral", seed=0, **kw):
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, norm_topk_prob=family == "mixtral"))
    base = dict(family=family, vocab_size=61, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                num_kv_heads=2, rope_theta=300.0, max_seq_len=64, moe=moe)
    if family == "qwen2_moe":
        base.update(attention_bias=True, shared_expert_intermediate_size=16)
    base.update(kw)
    torch.manual_seed(seed)
    return randomize(build_model(ModelConfig(**base)), seed).eval()


EXPORT_CASES = [
    ("mixtral", dict()),
    ("mixtral", dict(tie_word_embeddings=True, num_kv_heads=4, moe=MoEConfig(num_experts=3, top_k=1))),
    ("qwen2_moe", dict()),
    ("qwen2_moe", dict(shared_expert_intermediate_size=0, attention_bias=False, head_dim=12,
                       moe=MoEConfig(num_experts=5, top_k=3, norm_topk_prob=True))),
]


@pytest.mark.parametrize("family,kw", EXPORT_CASES)
def test_export_loads_in_transformers_with_same_logits(tmp_path, family, kw):
    model = our_model(family, seed=11, **kw)
    want = ours_logits(model, IDS)
    out = to_hf(model, tmp_path / "export")
    assert out == (tmp_path / "export").absolute()
    ref, info = load_in_transformers(out)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf_logits(ref, IDS) - want).abs().max().item() <= TOL
    back = from_hf(out)
    assert back.config == model.config
    assert_same_tensors(back, model)


def test_sharded_export_loads_in_transformers_and_back(tmp_path):
    model = our_model("qwen2_moe", seed=2)
    want = ours_logits(model, IDS)
    to_hf(model, tmp_path / "export", max_shard_size="16KB")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "export" / "model.safetensors").exists()
    for f in files:  # no shard over the limit unless it holds a single tensor
        sd = load_file(str(tmp_path / "export" / f))
        assert len(sd) == 1 or sum(t.numel() * t.element_size() for t in sd.values()) <= 16_000
    ref, _ = load_in_transformers(tmp_path / "export")
    assert (hf_logits(ref, IDS) - want).abs().max().item() <= TOL
    assert_same_tensors(from_hf(tmp_path / "export"), model)


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("router", ["null_experts", "adak"])
def test_null_and_adak_models_round_trip_exactly(tmp_path, family, router):
    if router == "null_experts":
        moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=8, top_k=3, baseline_top_k=2,
                        norm_topk_prob=family == "mixtral", expert_bias_rate=1e-3, aux_loss_coef=1e-2,
                        target_true_experts=1.5)
    else:
        moe = MoEConfig(router="adak", num_experts=4, top_k=2, k_min=0, k_max=3, norm_topk_prob=family == "mixtral")
    model = our_model(family, seed=4, moe=moe)
    if router == "null_experts":
        with torch.no_grad():
            for r in model.routers():  # selection biases that change the routing: must survive the trip
                r.expert_bias.copy_(torch.randn(4))
                r.null_bias.fill_(0.3)
                r.null_bias_integral.fill_(-0.7)
    to_hf(model, tmp_path / "x")  # the shipped modeling code routes with the expert bias: no warning that it is lost
    hf = json.loads((tmp_path / "x" / "config.json").read_text())
    assert hf["moe_train"]["router"] == router and hf["model_type"] == "moe_train"
    extra = "null_gate.weight" if router == "null_experts" else "allocator.weight"
    prefix = "block_sparse_moe." if family == "mixtral" else "mlp."
    with safe_open(str(tmp_path / "x" / "model.safetensors"), "pt") as f:
        w = f.get_tensor(f"model.layers.1.{prefix}{extra}")
    src = model.layers[1].moe.router.null_gate if router == "null_experts" else model.layers[1].moe.router.allocator
    assert torch.equal(w, src.weight)
    back = from_hf(tmp_path / "x")
    assert back.config == model.config
    assert_same_tensors(back, model)
    assert torch.equal(ours_logits(back, IDS), ours_logits(model, IDS))
    # transformers runs the folder's own modeling code (io/hf_remote), the whole router; never silently top-k
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_in_transformers(tmp_path / "x")
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf_logits(ref.eval(), IDS) - ours_logits(model, IDS)).abs().max().item() <= TOL


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    model = our_model("mixtral", seed=6).to(torch.bfloat16)
    to_hf(model, tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    back = from_hf(tmp_path / "bf", dtype=None)
    assert_same_tensors(back, model)
    assert safetensors_folder.stored_dtype(tmp_path / "bf") == torch.bfloat16
    assert from_hf(tmp_path / "bf").embed_tokens.weight.dtype == torch.float32


def test_export_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    dst = tmp_path / "export"
    first = our_model("mixtral", seed=1)
    to_hf(first, dst)
    (dst / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    calls = []

    header = safetensors_folder._header

    def crash(specs, names):  # the second shard file fails as it starts
        calls.append(names)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return header(specs, names)

    monkeypatch.setattr(safetensors_folder, "_header", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        to_hf(our_model("mixtral", seed=2), dst, max_shard_size="16KB")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp folder left behind
    monkeypatch.undo()

    second = our_model("mixtral", seed=2)
    to_hf(second, dst, max_shard_size="16KB")
    assert (dst / "tokenizer.json").read_text() == "{}"  # carried over
    assert not (dst / "model.safetensors").exists()  # stale single file is not carried over
    assert_same_tensors(from_hf(dst), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ------------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.fixture
def saved(tmp_path):
    def make(family="mixtral", **kw):
        path = tmp_path / f"{family}-{len(list(tmp_path.iterdir()))}"
        hf_model(family, **kw).save_pretrained(path)
        return path
    return make


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DELETE = object()


@pytest.mark.parametrize("family,changes,match", [
    ("mixtral", dict(model_type="llama"), "model_type='llama' is not supported"),
    ("mixtral", dict(sliding_window=16), "sliding_window=16"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 2),
     "sliding_window=8"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers=\\[1\\]"),
    ("qwen2_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    ("qwen2_moe", dict(num_experts=0), "expert"),
    ("mixtral", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type='yarn'"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("mixtral", dict(rope_parameters={"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": 1e6}}),
     "rope_parameters differ per layer type"),
    ("mixtral", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    ("mixtral", dict(num_attention_heads=5), "num_heads"),
    ("mixtral", dict(moe_train={"router": "null_experts", "num_experts": 4, "num_null_experts": 3, "top_k": 9}), "top_k"),
    ("mixtral", dict(moe_train={"router": "topk", "num_experts": 4, "top_k": 3}), "num_experts_per_tok=2"),
    ("mixtral", dict(moe_train={"router": "topk", "num_experts": 4, "top_k": 2, "bogus": 1}), "bogus"),
])
def test_unsupported_configs_are_rejected(saved, family, changes, match):
    path = saved(family)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(path)


def test_legacy_config_fields_are_read_as_transformers_reads_them(tmp_path):
    """transformers 4.x style: top-level rope_theta, null num_key_value_heads (= MHA), torch_dtype."""
    ref = hf_model("mixtral", seed=9, num_key_value_heads=4)
    want = hf_logits(ref, IDS)
    ref.save_pretrained(tmp_path / "old")
    edit_config(tmp_path / "old", rope_parameters=_DELETE, rope_theta=500.0, num_key_value_heads=None,
                dtype=_DELETE, torch_dtype="float32")
    model = from_hf(tmp_path / "old")
    assert (model.config.rope_theta, model.config.num_kv_heads) == (500.0, 4)
    assert (ours_logits(model, IDS) - want).abs().max().item() <= TOL


def test_sliding_window_not_shorter_than_context_is_accepted(saved):
    path = saved("mixtral")
    edit_config(path, sliding_window=64)  # == max_position_embeddings: never truncates attention
    from_hf(path)


def test_missing_unexpected_and_misshapen_tensors_are_named(saved):
    path = saved("mixtral")
    sd = load_file(str(path / "model.safetensors"))

    def rewrite(d):
        save_file(d, str(path / "model.safetensors"), metadata={"format": "pt"})

    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    rewrite({k: v for k, v in sd.items() if k != name})
    with pytest.raises(ValueError, match=f"{name}.*missing"):
        from_hf(path)
    rewrite({**sd, name: sd[name][:, :-1].contiguous()})
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        from_hf(path)
    rewrite({**sd, "model.layers.0.mlp.dense.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="model.layers.0.mlp.dense.weight"):
        from_hf(path)
    rewrite({k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="lm_head.weight.*missing"):
        from_hf(path)


def test_null_model_without_its_null_gate_is_rejected(tmp_path):
    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=2)
    to_hf(our_model("mixtral", moe=moe), tmp_path / "x")
    sd = load_file(str(tmp_path / "x" / "model.safetensors"))
    sd.pop("model.layers.0.block_sparse_moe.null_gate.weight")
    save_file(sd, str(tmp_path / "x" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="null_gate.weight.*missing.*null experts"):
        from_hf(tmp_path / "x")


def test_bad_folders_are_rejected(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        from_hf(tmp_path / "empty")
    path = saved("mixtral")
    os.remove(path / "model.safetensors")
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        from_hf(path)
    ref = hf_model("mixtral")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(ValueError, match=f"shard '{shard.name}'.*missing"):
        from_hf(tmp_path / "sharded")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        to_hf(our_model(), tmp_path / "afile")


def test_export_rejects_what_the_format_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="Mixtral checkpoint cannot express a shared expert"):
        to_hf(our_model("mixtral", shared_expert_intermediate_size=8), tmp_path / "a")
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        to_hf(our_model("mixtral", moe=MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False)), tmp_path / "b")
    with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
        to_hf(our_model(), tmp_path / "c", max_shard_size="5 parsecs")
    assert not any(tmp_path.iterdir())
    assert safetensors_folder.parse_shard_size("2GiB") == 2 * 2**30 and safetensors_folder.parse_shard_size("5GB") == 5 * 10**9
    assert safetensors_folder.parse_shard_size(123) == 123
