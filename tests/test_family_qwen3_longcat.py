"""Qwen3-MoE and LongCat-Flash families against transformers itself (fp32, eager attention, eager experts):
import and export parity at several tiny shapes (odd head counts, head dims, vocabularies), the settings refused by
name, AdaMoE / Ada-K conversion, LoRA and FLOPs.

Parity figures (max |logit diff|) are printed with -s: ``python -m pytest -q -s tests/test_family_qwen3_longcat.py``.
"""

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.io.hf import from_hf, to_hf  # noqa: E402
from moe_train.model import build_model  # noqa: E402

TOL = 1e-4
VOCAB = 61  # odd on purpose
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def randomize(model, seed, std=0.15):
    """Weights big enough that routing and every norm / bias visibly matter (selection biases stay as they are)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif "bias" in name and p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def eager(model):
    """transformers' plain-matmul attention and per-expert loop (its grouped_mm experts need aligned widths)."""
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model.eval()


def theirs(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def ours(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids)


def load_in_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return eager(model)


def assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def report(what, diff):
    print(f"\nPARITY {what}: max |logit diff| = {diff:.3g}")


# ------------------------------------------------------------------------------------------------------------
# Qwen3-MoE


def hf_qwen3(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    base.update(kw)
    return randomize(eager(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**base))), seed)


QWEN3_IMPORT = {
    "gqa": dict(),  # GQA 4/2, top-2 of 4, raw probabilities (transformers' default norm_topk_prob false)
    # odd everything: 3 heads over 1 kv head, head_dim 10 != D/H, D 36, expert width 20, q/k/v/o biases, tied head
    "odd": dict(hidden_size=36, num_attention_heads=3, num_key_value_heads=1, head_dim=10, moe_intermediate_size=20,
                num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, attention_bias=True,
                tie_word_embeddings=True, rms_norm_eps=1e-3),
    "mha": dict(num_attention_heads=5, num_key_value_heads=5, head_dim=6, num_experts=3, num_experts_per_tok=1,
                norm_topk_prob=True),  # MHA, odd head count, top-1
}


@pytest.mark.parametrize("name", list(QWEN3_IMPORT))
def test_qwen3_import_matches_transformers(tmp_path, name):
    ref = hf_qwen3(seed=len(name), **QWEN3_IMPORT[name])
    ref.save_pretrained(tmp_path / "ckpt")
    model = from_hf(tmp_path / "ckpt")
    assert model.config.family == "qwen3_moe"
    assert model.config.moe.norm_topk_prob == ref.config.norm_topk_prob
    assert model.config.shared_expert_intermediate_size == 0
    want = theirs(ref)
    diff = (ours(model) - want).abs().max().item()
    report(f"qwen3_moe import {name}", diff)
    assert diff <= TOL and want.std() > 0.1


def our_model(family, seed=0, **kw):
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, norm_topk_prob=True))
    base = dict(family=family, vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                num_kv_heads=2, rope_theta=300.0, max_seq_len=64, moe=moe)
    base.update(kw)
    torch.manual_seed(seed)
    return randomize(build_model(ModelConfig(**base)), seed).eval()


QWEN3_EXPORT = {
    "gqa": dict(),
    "odd": dict(hidden_size=36, num_heads=3, num_kv_heads=1, head_dim=10, intermediate_size=20, attention_bias=True,
                tie_word_embeddings=True, moe=MoEConfig(num_experts=5, top_k=3, norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", list(QWEN3_EXPORT))
def test_qwen3_export_loads_in_transformers_with_same_logits(tmp_path, name):
    model = our_model("qwen3_moe", seed=11, **QWEN3_EXPORT[name])
    assert model.layers[0].self_attn.q_norm is not None
    to_hf(model, tmp_path / "export")
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["model_type"] == "qwen3_moe" and hf["architectures"] == ["Qwen3MoeForCausalLM"]
    ref = load_in_transformers(tmp_path / "export")
    diff = (theirs(ref) - ours(model)).abs().max().item()
    report(f"qwen3_moe export {name}", diff)
    assert diff <= TOL
    back = from_hf(tmp_path / "export")
    assert back.config == model.config
    assert_same_tensors(back, model)


def _edit(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(mlp_only_layers=[0]), "mlp_only_layers=\\[0\\]"),
    (dict(use_sliding_window=True, sliding_window=8), "sliding_window=8"),
])
def test_qwen3_settings_moe_train_cannot_reproduce_are_refused(tmp_path, changes, match):
    hf_qwen3().save_pretrained(tmp_path / "ckpt")
    _edit(tmp_path / "ckpt", **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path / "ckpt")


def test_qwen3_published_num_experts_key_is_read(tmp_path):
    """Published Qwen3-MoE configs say num_experts; transformers 5 saves num_local_experts: both import."""
    ref = hf_qwen3(seed=3)
    ref.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    assert (ours(from_hf(tmp_path / "ckpt")) - theirs(ref)).abs().max().item() <= TOL


def test_qwen3_adamoe_and_adak_conversions_preserve_the_function(tmp_path):
    """moe-train convert (AdaMoE, n=4, m=4, k=4: ceil(4/2) = 2 true experts at step 0) and Ada-K with k forced to
    the base top_k both reproduce transformers' logits of the source; LoRA merges into an export transformers loads."""
    from moe_train.cli import main
    from moe_train.io.adak_convert import add_allocators
    from moe_train.routing.adak import routing_mode

    ref = hf_qwen3(seed=5, norm_topk_prob=True)
    want = theirs(ref)
    ref.save_pretrained(tmp_path / "src")
    assert main(["convert", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--num-null-experts",
                 "4", "--top-k", "4"]) == 0
    ada = from_hf(tmp_path / "dst")
    assert (ada.config.family, ada.config.moe.router, ada.config.moe.baseline_top_k) == ("qwen3_moe", "null_experts", 2)
    assert (ours(ada) - want).abs().max().item() <= TOL
    adak = add_allocators(from_hf(tmp_path / "src"), k_min=0, k_max=4)
    routers = adak.routers()
    with routing_mode(routers, "forced", [torch.full((IDS.numel(),), 2, dtype=torch.long)] * len(routers)):
        assert (ours(adak) - want).abs().max().item() <= TOL


def test_qwen3_lora_covers_attention_and_experts_and_merges_into_an_export(tmp_path):
    from moe_train.model.lora import apply_lora, merge_lora_state_dict

    model = our_model("qwen3_moe", seed=2)
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and name.endswith("_B"):
                p.normal_(0, 0.1)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.o_proj.lora_B",
            "layers.1.moe.experts.lora_down_B"} <= names
    assert "layers.0.self_attn.q_norm.weight" in names  # the per-head norms stay plain parameters
    want = ours(model)
    plain = build_model(model.config)
    plain.load_state_dict(merge_lora_state_dict(model.state_dict(), alpha=4.0))
    to_hf(plain, tmp_path / "merged")
    assert (theirs(load_in_transformers(tmp_path / "merged")) - want).abs().max().item() <= TOL


def test_qwen3_flops_per_token_hand_computed():
    """Qwen3-30B-A3B shape (D 2048, 48 layers, 32 heads / 4 kv of head_dim 128, 128 experts of width 768, top-8,
    vocab 151936) at S = 4096; q/k norms are not counted (negligible), as no norm is."""
    from moe_train.model.flops import forward_flops_per_token

    cfg = ModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=768, num_layers=48,
                      num_heads=32, num_kv_heads=4, head_dim=128, max_seq_len=40960,
                      moe=MoEConfig(num_experts=128, top_k=8))
    # per layer: q 2*2048*4096 = 16,777,216; k+v 2*2*2048*512 = 4,194,304; o 16,777,216;
    # scores 2*2*2048.5*4096 = 33,562,624; router 2*2048*128 = 524,288; experts 8*3*2*2048*768 = 75,497,472
    per_layer = 16_777_216 + 4_194_304 + 16_777_216 + 33_562_624 + 524_288 + 75_497_472
    want = 48 * per_layer + 2 * 2048 * 151936  # + lm head 622,329,856
    assert per_layer == 147_333_120 and want == 7_694_319_616
    assert forward_flops_per_token(cfg, 8.0, 4096) == want


# ------------------------------------------------------------------------------------------------------------
# LongCat-Flash


def hf_longcat(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=3, ffn_hidden_size=40,
                q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, head_dim=4, v_head_dim=5,
                moe_topk=3, n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=24,
                routed_scaling_factor=2.5, max_position_embeddings=64)
    base.update(kw)
    model = randomize(eager(transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**base))), seed)
    with torch.no_grad():  # a correction bias that changes selections, over the FFN and the zero experts
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0, 0.1)
    return model


LONGCAT_IMPORT = {
    "base": dict(),  # 3 heads, nope 6 / rope 4 / v 5, q-LoRA 12, kv-LoRA 10; 4 FFN + 2 identity experts, top-3
    # odd: 5 heads, rope 6, v 7, nope 3, ranks 9 / 7, 6 + 3 experts top-4, q/kv/o biases, tied head, eps 1e-3
    "odd": dict(hidden_size=36, num_attention_heads=5, qk_nope_head_dim=3, qk_rope_head_dim=6, head_dim=6,
                v_head_dim=7, q_lora_rank=9, kv_lora_rank=7, ffn_hidden_size=20, expert_ffn_hidden_size=12,
                n_routed_experts=6, zero_expert_num=3, moe_topk=4, routed_scaling_factor=6.0, attention_bias=True,
                tie_word_embeddings=True, rms_norm_eps=1e-3),
    "no_zero_experts": dict(zero_expert_num=0, moe_topk=2, num_layers=1),  # a plain top-k router with the bias
}


@pytest.mark.parametrize("name", list(LONGCAT_IMPORT))
def test_longcat_import_matches_transformers(tmp_path, name):
    ref = hf_longcat(seed=len(name), **LONGCAT_IMPORT[name])
    ref.save_pretrained(tmp_path / "ckpt")
    model = from_hf(tmp_path / "ckpt")
    c, z = model.config, ref.config.zero_expert_num
    assert c.family == "longcat_flash" and c.num_layers == ref.config.num_layers
    assert (c.moe.router, c.moe.num_null_experts) == (("null_experts", z) if z else ("topk", 0))
    if z:
        assert c.moe.null_kind == "identity"
    want = theirs(ref)
    diff = (ours(model) - want).abs().max().item()
    report(f"longcat_flash import {name}", diff)
    assert diff <= TOL and want.std() > 0.1


def longcat_model(seed=0, **kw):
    moe = kw.pop("moe", MoEConfig(router="null_experts", num_experts=4, num_null_experts=2, null_kind="identity", top_k=3,
                                  norm_topk_prob=False, routed_scaling_factor=2.0, use_expert_bias=True))
    base = dict(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, num_heads=3,
                num_kv_heads=3, dense_intermediate_size=20, moe=moe)
    base.update(kw)
    model = our_model("longcat_flash", seed=seed, **base)
    with torch.no_grad():
        for r in model.routers():
            r.expert_bias.normal_(0, 0.1)
            if getattr(r, "null_expert_bias", None) is not None:
                r.null_expert_bias.normal_(0, 0.1)
    return model


def test_longcat_export_loads_in_transformers_with_same_logits(tmp_path):
    model = longcat_model(seed=11)
    to_hf(model, tmp_path / "export")
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (hf["num_layers"], hf["zero_expert_num"], hf["moe_topk"]) == (2, 2, 3) and "num_hidden_layers" not in hf
    ref = load_in_transformers(tmp_path / "export")
    diff = (theirs(ref) - ours(model)).abs().max().item()
    report("longcat_flash export base", diff)
    assert diff <= TOL
    back = from_hf(tmp_path / "export")
    assert back.config == model.config
    assert_same_tensors(back, model)


def test_longcat_export_with_a_compute_budget_routes_the_same_in_transformers(tmp_path):
    """Odd shape; the budget's shared null bias is part of what the zero experts are selected with: transformers gets
    it inside e_score_correction_bias, from_hf gets every buffer back bit for bit."""
    moe = MoEConfig(router="null_experts", num_experts=6, num_null_experts=3, null_kind="identity", top_k=4,
                    norm_topk_prob=False, routed_scaling_factor=6.0, use_expert_bias=True, expert_bias_rate=1e-3,
                    target_true_experts=2.5)
    model = longcat_model(seed=5, hidden_size=36, num_heads=5, num_kv_heads=5, qk_nope_head_dim=3,
                          qk_rope_head_dim=6, v_head_dim=7, q_lora_rank=9, kv_lora_rank=7, intermediate_size=12,
                          attention_bias=True, tie_word_embeddings=True, moe=moe)
    with torch.no_grad():
        for r in model.routers():
            r.null_bias.fill_(0.05)
            r.null_bias_integral.fill_(3.0)
    to_hf(model, tmp_path / "export")
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert {k.rsplit(".", 1)[-1] for k in info["unexpected_keys"]} == {"null_bias", "null_bias_integral",
                                                                         "null_expert_bias"}
    diff = (theirs(eager(ref)) - ours(model)).abs().max().item()
    report("longcat_flash export odd+budget", diff)
    assert diff <= TOL
    back = from_hf(tmp_path / "export")
    assert back.config == model.config
    assert_same_tensors(back, model)


@pytest.mark.parametrize("changes,match", [
    (dict(router_bias=True), "router_bias=True"),
    (dict(head_dim=6), "head_dim=6.*qk_rope_head_dim=4"),
    (dict(zero_expert_type="zero"), "zero_expert_type='zero'"),
    (dict(num_key_value_heads=1), "num_kv_heads"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type='yarn'"),
])
def test_longcat_settings_moe_train_cannot_reproduce_are_refused(tmp_path, changes, match):
    hf_longcat(num_layers=1).save_pretrained(tmp_path / "ckpt")
    _edit(tmp_path / "ckpt", **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path / "ckpt")


def test_longcat_zero_experts_are_never_dispatched():
    """Identity picks add gate * x on the token's rank: only the FFN picks reach the expert GEMMs."""
    model = longcat_model(seed=3)
    with torch.no_grad():
        _, plans = model.eval()(IDS, return_plans=True)
    for plan in plans:
        ffn_picks = int((plan.expert_idx_TK >= 0).sum())
        null_picks = int((plan.null_idx_TK >= 0).sum())
        assert int(plan.counts_E.sum()) == ffn_picks and null_picks > 0
        assert ffn_picks + null_picks == IDS.numel() * 3


def test_longcat_miniature_trains_under_ep2_through_the_cli_and_exports_to_transformers(tmp_path):
    """configs/tiny_longcat.yaml on 2 gloo ranks (dp 1 x ep 2) through `moe-train train --miniature`: identity zero
    experts, correction biases, the compute budget; the HF export loads in transformers with the final logits."""
    from pathlib import Path

    from moe_train.cli import main
    from moe_train.io.model_file import load_model

    out, single = tmp_path / "run", tmp_path / "single"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_longcat.yaml")
    assert main(["train", "--config", config, "--miniature", "--set", "parallel.ep=2", "--set",
                 "parallel.world_size=2", "--set", f"train.out_dir={out}"]) == 0
    # the reference: one process on the same global batches (budget and bias updates from the same counts)
    assert main(["train", "--config", config, "--miniature", "--set", "train.export_hf=false", "--set",
                 f"train.out_dir={single}"]) == 0
    steps, ref = ([json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" not in line] for o in (out, single))
    assert len(steps) == len(ref) == 3
    for r, w in zip(steps, ref):
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5) and torch.isfinite(torch.tensor(r["loss"]))
        assert r["true_experts_per_token"] == w["true_experts_per_token"]
        assert 0 < r["true_experts_per_token"] < 3  # zero experts picked, never all of them
    final = load_model(out / "final" / "model.pt").float().eval()
    assert final.config.family == "longcat_flash" and final.config.moe.null_kind == "identity"
    ids = torch.randint(0, final.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (theirs(load_in_transformers_lenient(out / "hf"), ids) - ours(final, ids)).abs().max().item()
    report("longcat_flash ep2 miniature export", diff)
    assert diff <= TOL


def load_in_transformers_lenient(path):
    """Loads an export whose router carries moe_train's budget state as extras (unexpected keys for transformers)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return eager(model)


def test_longcat_flash_flops_per_token_hand_computed():
    """LongCat-Flash's shape (transformers' LongcatFlashConfig defaults: D 6144, 28 layers of 2 MLA sublayers with
    64 heads, q-LoRA 1536, kv-LoRA 512, nope 128 / rope 64 / v 128, two dense MLPs of 12288, 512 FFN experts of 2048
    + 256 zero-computation experts, top-12, vocab 131072) at S = 4096 with 8 FFN experts per token on average: the
    4 identity picks cost no expert FLOPs."""
    from moe_train.model.flops import flops_vs_topk, forward_flops_per_token

    cfg = ModelConfig(family="longcat_flash", vocab_size=131072, hidden_size=6144, intermediate_size=2048,
                      dense_intermediate_size=12288, num_layers=28, num_heads=64, num_kv_heads=64, q_lora_rank=1536,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=131072,
                      moe=MoEConfig(router="null_experts", num_experts=512, num_null_experts=256, null_kind="identity",
                                    top_k=12, norm_topk_prob=False, routed_scaling_factor=6.0, use_expert_bias=True))
    # one MLA sublayer: q 2*6144*1536 + 2*1536*64*192 = 56,623,104; kv 2*6144*576 + 2*512*64*256 = 23,855,104;
    # o 2*64*128*6144 = 100,663,296; scores 2*2048.5*64*192 + 2*2048.5*64*128 = 83,906,560  -> 265,048,064
    mla = 56_623_104 + 23_855_104 + 100_663_296 + 83_906_560
    # per layer: 2 MLA + 2 dense MLPs 2*3*2*6144*12288 = 905,969,664 + router 2*6144*768 = 9,437,184
    # + 8 FFN experts 8*3*2*6144*2048 = 603,979,776 (+ 4 identity picks: 0)
    per_layer = 2 * mla + 905_969_664 + 9_437_184 + 603_979_776
    want = 28 * per_layer + 2 * 6144 * 131072  # + lm head 1,610,612,736
    assert mla == 265_048_064 and per_layer == 2_049_482_752 and want == 58_996_129_792
    assert forward_flops_per_token(cfg, 8.0, 4096) == want
    # against all 12 picks on FFN experts with a plain 512-expert router: 67,363,766,272
    assert flops_vs_topk(cfg, 8.0, 4096) == pytest.approx(58_996_129_792 / 67_363_766_272, rel=1e-12)


def test_longcat_lora_covers_both_attention_sublayers_and_merges_into_an_export(tmp_path):
    from moe_train.model.lora import apply_lora, merge_lora_state_dict

    model = longcat_model(seed=2)
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and name.endswith("_B"):
                p.normal_(0, 0.1)
    names = {n for n, _ in model.named_parameters()}
    for j in (0, 1):
        assert {f"layers.1.self_attn.{j}.{proj}.lora_A" for proj in
                ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")} <= names
    assert "layers.0.moe.experts.lora_gate_A" in names and "layers.0.mlps.0.gate_proj.weight" in names
    want = ours(model)
    plain = build_model(model.config)
    plain.load_state_dict(merge_lora_state_dict(model.state_dict(), alpha=4.0))
    to_hf(plain, tmp_path / "merged")
    assert (theirs(load_in_transformers(tmp_path / "merged")) - want).abs().max().item() <= TOL


def test_longcat_conversions_are_refused_by_name():
    """LongCat-Flash routes over identity zero experts already (its compute is steered with the budget,
    model.moe.target_true_experts): AdaMoE's zero null experts do not apply. (Ada-K over its ranking of FFN +
    identity experts does: tests/test_longcat_adak.py.)"""
    from moe_train.io.convert import add_null_experts

    with pytest.raises(ValueError, match="router is 'null_experts'.*'identity'.*target_true_experts"):
        add_null_experts(longcat_model(), 4, 4)
    no_zero = longcat_model(moe=MoEConfig(num_experts=4, top_k=2, norm_topk_prob=False, use_expert_bias=True))
    with pytest.raises(ValueError, match="null_kind.*identity for longcat_flash"):
        add_null_experts(no_zero, 4, 4, null_tie_break="topk")
    assert no_zero.config.moe.router == "topk"  # untouched


def test_longcat_mtp_tensors_are_skipped_as_transformers_skips_them(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = hf_longcat(seed=4, num_layers=1)
    ref.save_pretrained(tmp_path / "ckpt")
    f = str(tmp_path / "ckpt" / "model.safetensors")
    sd = load_file(f)
    save_file({**sd, "model.mtp.layers.0.eh_proj.weight": torch.zeros(4, 4)}, f, metadata={"format": "pt"})
    assert (ours(from_hf(tmp_path / "ckpt")) - theirs(ref)).abs().max().item() <= TOL
    save_file({**sd, "model.layers.0.mlp.shared_experts.weight": torch.zeros(4, 4)}, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shared_experts.weight"):
        from_hf(tmp_path / "ckpt")


def test_longcat_fused_in_memory_expert_layout_is_read(tmp_path):
    """transformers' in-memory names (mlp.experts.gate_up_proj [n + z, 2F, D], down_proj [n, D, F]) import too."""
    from safetensors.torch import save_file

    ref = hf_longcat(seed=6, num_layers=1)
    ref.save_pretrained(tmp_path / "ckpt")
    fused = {n: t.detach().clone().contiguous() for n, t in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    save_file(fused, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    assert (ours(from_hf(tmp_path / "ckpt")) - theirs(ref)).abs().max().item() <= TOL
