"""DeepSeek-V2 / V3 families against transformers' deepseek_v2 / deepseek_v3 (eager attention, fp32): import and
export parity at several tiny shapes (one nobody tunes to), e_score_correction_bias as the trained expert bias,
group-limited routing with null experts against a hand computation, AdamoE / Ada-K conversions that preserve the
function, LoRA on MLA, FLOPs of DeepSeek-V2-Lite by hand, and the refusals.
"""

import copy
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from moe_train.config import ConfigError, ModelConfig, MoEConfig, validate_model  # noqa: E402
from moe_train.io.adak_convert import add_allocators  # noqa: E402
from moe_train.io.convert import add_null_experts, convert_to_adamoe  # noqa: E402
from moe_train.io.hf import from_hf, to_hf  # noqa: E402
from moe_train.model import build_model  # noqa: E402
from moe_train.model.flops import forward_flops_per_token  # noqa: E402
from moe_train.model.lora import apply_lora, merge_lora_state_dict  # noqa: E402
from moe_train.routing import NullExpertRouter  # noqa: E402
from moe_train.routing.adak import routing_mode  # noqa: E402

TOL = 1e-4  # fp32 (measured ~1e-6)
VOCAB = 67
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
YARN_V2_LITE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}  # DeepSeek-V2-Lite's config.json


@torch.no_grad()
def randomize(model, seed, std=0.15):
    """Weights big enough that routing, every norm and the correction bias visibly matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if "norm" in name else
                std * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model


def hf_deepseek(family, seed=0, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_shared_experts=1, n_routed_experts=8,
                num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64)
    if family == "deepseek_v3":
        base.update(n_group=1, topk_group=1)
    base.update(copy.deepcopy(kw))  # transformers writes into a rope_scaling dict it is given
    if kw.get("num_attention_heads"):
        base["num_key_value_heads"] = kw["num_attention_heads"]
    cls, ccls = ((transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config) if family == "deepseek_v2"
                 else (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config))
    torch.manual_seed(seed)
    model = cls(ccls(**base))
    model.config._attn_implementation = "eager"
    return randomize(model, seed).eval()


@torch.no_grad()
def logits(model, ids=IDS):
    out = model.eval()(ids)
    return out if torch.is_tensor(out) else out.logits


def load_in_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                                    output_loading_info=True)
    return model.eval(), info


PARITY = [
    ("deepseek_v2", dict()),  # greedy softmax, full q_proj, one dense layer, scaling 1
    ("deepseek_v2", dict(q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                         routed_scaling_factor=1.7, rope_scaling=YARN_V2_LITE, max_position_embeddings=163840)),
    # a shape nobody tunes to: 3 heads, odd value / query-rank dims, rope 6, vocab 67, 6 experts (transformers' V2
    # complex rotation needs the rotary slices at even offsets: even nope and latent dims; V3 below takes odd ones)
    ("deepseek_v2", dict(hidden_size=36, num_attention_heads=3, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=7,
                         kv_lora_rank=14, q_lora_rank=11, n_routed_experts=6, num_experts_per_tok=3,
                         n_shared_experts=2, first_k_dense_replace=2, moe_intermediate_size=12,
                         attention_bias=True)),
    ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),  # sigmoid, bias, groups, norm
    ("deepseek_v3", dict(hidden_size=36, num_attention_heads=3, qk_nope_head_dim=5, qk_rope_head_dim=6,
                         v_head_dim=7, kv_lora_rank=13, q_lora_rank=11, n_routed_experts=6, n_group=3,
                         topk_group=2, num_experts_per_tok=3, norm_topk_prob=False, rope_interleave=False,
                         first_k_dense_replace=0, routed_scaling_factor=0.6, tie_word_embeddings=True)),
    ("deepseek_v3", dict(n_group=2, topk_group=1, rope_scaling=dict(YARN_V2_LITE, mscale=1.1, mscale_all_dim=0.9),
                         max_position_embeddings=163840)),  # yarn with attention_factor != 1
]


@pytest.mark.parametrize("family,kw", PARITY)
def test_import_and_export_match_transformers(tmp_path, family, kw):
    ref = hf_deepseek(family, seed=len(kw), **kw)
    want = logits(ref)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    got = logits(ours)
    assert ours.config.family == family and want.std() > 0.1
    assert (got - want).abs().max().item() <= TOL
    back, info = load_in_transformers(to_hf(ours, tmp_path / "export"))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(back) - got).abs().max().item() <= TOL
    again = from_hf(tmp_path / "export")
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_correction_bias_is_the_trained_expert_bias(tmp_path):
    """e_score_correction_bias imports into expert_bias; the aux-loss-free update changes it; transformers routes
    the exported model with the updated bias (equal logits), and a bias that selects differently matters."""
    ref = hf_deepseek("deepseek_v3", seed=3, n_group=2, topk_group=1)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    r = ours.routers()[0]
    assert ours.config.moe.use_expert_bias and ours.config.moe.score_func == "sigmoid"
    assert torch.equal(r.expert_bias, ref.model.layers[1].mlp.gate.e_score_correction_bias)
    before = logits(ours)
    r.expert_bias_rate = 0.5  # a big step, so the selections move
    r.update_bias(torch.tensor([9, 0, 0, 0, 0, 0, 0, 7]))
    assert not torch.equal(r.expert_bias, ref.model.layers[1].mlp.gate.e_score_correction_bias)
    after = logits(ours)
    assert (after - before).abs().max() > 1e-3
    back, _ = load_in_transformers(to_hf(ours, tmp_path / "export"))
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias, r.expert_bias)
    assert (logits(back) - after).abs().max().item() <= TOL


def test_group_limited_routing_with_null_experts_by_hand():
    """E = 4 true experts in 2 groups {0,1} {2,3}, Z = 4 null experts (null j is the twin of true j mod 4), top-3 of
    the 8, topk_group 1, sigmoid scores with the gate = identity so logits are the input; noaux_tc scores a group
    by the sum of its two best bias-corrected TRUE scores (nulls never vote)."""
    cfg = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, score_func="sigmoid",
                    topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0)
    r = NullExpertRouter(8, cfg)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(8)[:4])
        r.null_gate.weight.copy_(torch.eye(8)[4:])
    s = torch.tensor([0.9, 0.1, 0.6, 0.5, 0.95, 0.2, 0.3, 0.99])  # the wanted sigmoid scores
    with torch.no_grad():
        plan = r(torch.logit(s.double()).float()[None])
    # groups: {0,1} = 0.9 + 0.1 = 1.0, {2,3} = 0.6 + 0.5 = 1.1 -> group 1 wins although expert 0 is the best;
    # eligible: true 2, 3 and their twins: nulls 2 (0.3) and 3 (0.99); nulls 0 (0.95) and 1 (0.2) are ruled out.
    # top-3 of {t2 .6, t3 .5, n2 .3, n3 .99} = n3, t2, t3 -> true picks 2, 3, one null slot
    assert sorted(plan.expert_idx_TK[0].tolist()) == [-1, 2, 3]
    w = {int(e): float(v) for e, v in zip(plan.expert_idx_TK[0], plan.weight_TK[0]) if e >= 0}
    # renormalised over the true picks, times routed_scaling_factor 2: 2 * .6 / 1.1, 2 * .5 / 1.1
    assert w == pytest.approx({2: 2 * 0.6 / 1.1, 3: 2 * 0.5 / 1.1}, rel=1e-5)
    # the same with greedy routing (no groups): n3 .99, n0 .95, t0 .9 -> one true pick, expert 0, weight 2
    greedy = NullExpertRouter(8, MoEConfig(**{**cfg.__dict__, "topk_method": "greedy"}))
    greedy.load_state_dict(r.state_dict())
    with torch.no_grad():
        plan = greedy(torch.logit(s.double()).float()[None])
    assert sorted(plan.expert_idx_TK[0].tolist()) == [-1, -1, 0]
    assert plan.weight_TK[0].max().item() == pytest.approx(2.0)


def test_adamoe_conversion_of_deepseek_v3_preserves_the_function(tmp_path):
    """Sigmoid scores, a nonzero correction bias and group limits: twins carry their expert's bias and group, so at
    step 0 a token picks exactly its top-k true experts (k = 2, r = 2 twins each, converted k = 6)."""
    ref = hf_deepseek("deepseek_v3", seed=5, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ref.save_pretrained(tmp_path / "hf")
    want = logits(ref)
    convert_to_adamoe(tmp_path / "hf", tmp_path / "ada", num_null_experts=16, top_k=6)
    ada = from_hf(tmp_path / "ada")
    assert ada.config.moe.router == "null_experts" and ada.config.moe.use_expert_bias
    with torch.no_grad():
        got, plans = ada.eval()(IDS, return_plans=True)
    assert (got - want).abs().max().item() <= 1e-5
    assert all(bool((p.true_mask_TK.sum(-1) == 2).all()) for p in plans)
    # transformers runs the converted router itself (the export's shipped modeling code, io/hf_remote)
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ada", trust_remote_code=True)
    assert (logits(remote.eval()) - want).abs().max().item() <= TOL


def test_adamoe_conversion_of_deepseek_v2_is_refused_clearly(tmp_path):
    ref = hf_deepseek("deepseek_v2", seed=1)
    ref.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="norm_topk_prob false.*cannot be function-preserving"):
        convert_to_adamoe(tmp_path / "hf", tmp_path / "ada", num_null_experts=8, top_k=4)
    assert not (tmp_path / "ada").exists()
    model = add_null_experts(from_hf(tmp_path / "hf"), 8, 4, null_tie_break="topk")  # the authors' recipe
    assert model.config.moe.router == "null_experts"


@pytest.mark.parametrize("family,kw", [("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2,
                                                            topk_group=1, routed_scaling_factor=1.5)),
                                       ("deepseek_v3", dict(n_group=4, topk_group=2))])
def test_adak_conversion_at_the_base_k_is_the_base_model(tmp_path, family, kw):
    ref = hf_deepseek(family, seed=2, **kw)
    ref.save_pretrained(tmp_path / "hf")
    base = from_hf(tmp_path / "hf")
    want = logits(base)
    model = add_allocators(from_hf(tmp_path / "hf"), k_min=1, k_max=4)
    k = base.config.moe.top_k
    routers = model.routers()
    actions = [torch.full((IDS.numel(),), k - 1) for _ in routers]
    with routing_mode(routers, "forced", actions):
        got = logits(model)
    assert (got - want).abs().max().item() <= 1e-6
    assert len(routers) == base.config.num_moe_layers == 2  # the dense first layer has no router


def test_lora_covers_mla_projections_and_merges(tmp_path):
    ref = hf_deepseek("deepseek_v3", seed=4, q_lora_rank=10)
    ref.save_pretrained(tmp_path / "hf")
    model = apply_lora(from_hf(tmp_path / "hf"), rank=2, alpha=4.0)
    names = {n for n, _ in model.named_parameters() if "lora_" in n}
    for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert f"layers.0.self_attn.{proj}.lora_A" in names, proj
    assert "layers.1.moe.experts.lora_gate_A" in names and not any(n.startswith("layers.0.mlp") for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and n.endswith("_B"):
                p.normal_(0, 0.1)
    want = logits(model)
    plain = build_model(model.config)
    plain.load_state_dict(merge_lora_state_dict(model.state_dict(), alpha=4.0))
    back, _ = load_in_transformers(to_hf(plain, tmp_path / "merged"))
    assert (logits(back) - want).abs().max().item() <= TOL


def test_deepseek_v2_lite_flops_per_token_by_hand():
    """DeepSeek-V2-Lite: D 2048, 27 layers (layer 0 dense, FFN 10944), 16 heads, MLA without query compression
    (C 512, nope 128, rope 64, value 128), 64 routed experts of 1408, top-6, 2 shared experts, vocab 102400; S 4096
    (mean causal context 2048.5)."""
    cfg = ModelConfig(family="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=1408,
                      dense_intermediate_size=10944, first_k_dense_replace=1, n_shared_experts=2, num_layers=27,
                      num_heads=16, num_kv_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840,
                      moe=MoEConfig(num_experts=64, top_k=6, norm_topk_prob=False))
    # attention: q 2*2048*16*192 = 12,582,912; kv_a 2*2048*(512+64) = 2,359,296; kv_b 2*512*16*(128+128) = 4,194,304;
    # o 2*16*128*2048 = 8,388,608; scores 2*2048.5*16*192 + 2*2048.5*16*128 = 12,585,984 + 8,390,656 = 20,976,640
    attn = 12_582_912 + 2_359_296 + 4_194_304 + 8_388_608 + 20_976_640
    # MoE layer: router 2*2048*64 = 262,144; routed 6*3*2*2048*1408 = 103,809,024; shared 2*3*2*2048*1408 = 34,603,008
    moe_layer = attn + 262_144 + 103_809_024 + 34_603_008
    dense_layer = attn + 3 * 2 * 2048 * 10944  # 134,479,872
    want = 26 * moe_layer + dense_layer + 2 * 2048 * 102400  # lm head 419,430,400
    assert attn == 48_501_760 and moe_layer == 187_175_936 and want == 5_468_986_368
    assert forward_flops_per_token(cfg, 6.0, 4096) == want
    assert forward_flops_per_token(cfg, [6.0] * 26, 4096) == want
    with pytest.raises(ValueError, match="26 MoE layers"):
        forward_flops_per_token(cfg, [6.0] * 27, 4096)


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=2), "num_kv_heads"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=2), "dense_intermediate_size"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(moe=MoEConfig(num_experts=8, n_group=3)), "n_group"),
    (dict(moe=MoEConfig(num_experts=8, n_group=4, topk_group=5)), "topk_group"),
    (dict(moe=MoEConfig(num_experts=8, top_k=5, topk_method="noaux_tc", n_group=4, topk_group=2)), "eligible"),
    (dict(moe=MoEConfig(num_experts=8, score_func="tanh")), "score_func"),
    (dict(family="mixtral", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
     "yarn"),
])
def test_bad_deepseek_configs_are_refused_by_name(change, match):
    from moe_train.config import RopeScalingConfig

    base = dict(family="deepseek_v3", num_layers=4, num_heads=4, num_kv_heads=4, moe=MoEConfig(num_experts=8))
    base.update(change)
    if isinstance(base.get("rope_scaling"), dict):
        base["rope_scaling"] = RopeScalingConfig(**base["rope_scaling"])
    with pytest.raises(ConfigError, match=match):
        validate_model(ModelConfig(**base))


@pytest.mark.parametrize("family,edit,match", [
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v2", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3"),
    ("deepseek_v2", {"num_key_value_heads": 2}, "num_key_value_heads"),
])
def test_unsupported_hf_settings_are_refused_by_name(tmp_path, family, edit, match):
    import json

    hf_deepseek(family).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path / "hf")


def _ep2_model_checks(cfg_dicts: list) -> list:
    """Rank side (tests/ep_workers.py spawns it): each model under ep 2 against the single-process model."""
    from moe_train.config import from_dict

    import ep_workers as W

    cfgs = [from_dict(ModelConfig, d) for d in cfg_dicts]
    ctx = W._ctx(2, cfgs[0].moe.num_experts, global_aux_loss=True)
    return [W.model_checks(ctx, c) for c in cfgs]


def test_expert_parallel_deepseek_v3_equals_single_process(tmp_path):
    """MLA, a dense first layer, a shared expert, sigmoid scores with noaux_tc groups and routed scaling, top-k and
    null routers (null twins in their true expert's group) under ep 2: loss, gradients and state as one process."""
    import dataclasses

    from moe_train.config import to_dict

    import ep_workers as W

    moe = MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, use_expert_bias=True, aux_loss_coef=0.01)
    base = ModelConfig(family="deepseek_v3", vocab_size=32, hidden_size=16, intermediate_size=8, num_layers=2,
                       num_heads=2, num_kv_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                       qk_rope_head_dim=4, v_head_dim=4, first_k_dense_replace=1, dense_intermediate_size=16,
                       n_shared_experts=1, max_seq_len=16, moe=moe)
    null = dataclasses.replace(base, moe=dataclasses.replace(moe, router="null_experts", num_null_experts=8, top_k=4))
    for rank, results in enumerate(W.spawn(_ep2_model_checks, 2, tmp_path, cfg_dicts=[to_dict(base), to_dict(null)])):
        for m in results:
            assert m["loss_err"] <= 1e-5, rank
            bad = {k: v for k, v in m["grad_err"].items() if not v <= 1e-5 * max(m["grad_scale"][k], 1e-6)}
            assert not bad, f"rank {rank}: {bad}"
            assert m["state_keys_equal"] and max(m["state_err"].values()) == 0.0
