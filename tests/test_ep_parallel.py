"""Expert parallelism on 2 and 4 gloo ranks against single-process references (tests/ep_workers.py runs the ranks).

One spawn per world size runs every check (spawning costs more than the checks):
  * one MoE layer, ep = world: outputs, input gradients and ALL parameter gradients equal the single-process layer
    on the concatenated tokens (fp32, 1e-5) for top-k, null-expert and Ada-K routing, a rank that receives no
    rows, tokens whose picks are all null and tokens with k = 0;
  * rows sent / received equal the true assignments exactly at null fractions 0, 25, 50 %;
  * capacity under EP: rows an expert receives from each source rank <= that rank's capacity;
  * the parallelized tiny model (FSDP2 over two meshes, global aux loss): every full gradient, the clipped
    gradients, the global grad norm and the gathered state dict equal the single-process model on the global batch.
And the trainer: 2 ranks with ep=2 follow the single-process loss trajectory.
"""

import json

import pytest
import torch

from moe_train.config import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig, to_dict

import ep_workers as W

TOL = 1e-5
ALL_CASES = list(W.LAYER_CASES)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    runs = [dict(ep=2, num_experts=4, cases=ALL_CASES)]
    return W.spawn("suite", 2, tmp_path_factory.mktemp("ep2"), ep=2, layer_runs=runs)


@pytest.fixture(scope="module")
def ep4(tmp_path_factory):
    # ep=4 layer runs use one group over all 4 ranks (L = 2 and L = 1 local experts); the model runs dp=2 x ep=2.
    runs = [dict(ep=4, num_experts=8, cases=ALL_CASES), dict(ep=4, num_experts=4, cases=["topk_zero_rank"])]
    return W.spawn("suite", 4, tmp_path_factory.mktemp("ep4"), ep=2, layer_runs=runs)


def _results(request, name):
    return request.getfixturevalue(name)


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_layer_outputs_and_all_gradients_match_single_process(request, world):
    for rank, res in enumerate(_results(request, world)):
        for run in res["layers"]:
            for case, r in run["cases"].items():
                bad = {k: v for k, v in r["err"].items() if not v <= TOL}  # fp32, relative to |ref| > 1 (W._relerr)
                assert not bad, f"rank {rank} E={run['num_experts']} {case}: errors above {TOL}: {bad}"
                assert any(k.startswith("grad:experts.") for k in r["err"]) and any(
                    k.startswith("grad:router.") for k in r["err"])
                assert r["rows_sent"] == r["true_local"]


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_edge_cases_were_exercised(request, world):
    res = _results(request, world)
    n = len(res)
    for i in range(len(res[0]["layers"])):
        cases = [r["layers"][i]["cases"] for r in res]
        if "topk_zero_rank" in cases[0]:  # the last rank received nothing, the others everything
            assert cases[n - 1]["topk_zero_rank"]["rows_received"] == 0
            assert sum(c["topk_zero_rank"]["rows_received"] for c in cases) == sum(
                c["topk_zero_rank"]["true_local"] for c in cases)
        if "null_all_null_tokens" in cases[0]:
            assert all(c["null_all_null_tokens"]["all_null_tokens"] > 0 for c in cases)
        if "adak_k0" in cases[0]:
            assert sum(c["adak_k0"]["all_null_tokens"] for c in cases) > 0


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_rows_sent_and_received_equal_true_assignments(request, world):
    res = _results(request, world)
    for run_i in range(len(res[0]["layers"])):
        by_frac = {}
        for r in res:
            for row in r["layers"][run_i]["rows"]["null"]:
                assert row["rows_sent"] == row["true_local"] == round(row["slots"] * (1 - row["frac"]))
                assert row["recv_counts_PL"] == row["expected_recv_PL"]  # exactly the senders' counts
                assert row["rows_received"] == sum(map(sum, row["expected_recv_PL"]))
                assert row["y_err"] <= TOL
                by_frac.setdefault(row["frac"], []).append(row)
        for frac, rows in by_frac.items():  # nothing lost or duplicated across ranks
            assert sum(r["rows_sent"] for r in rows) == sum(r["rows_received"] for r in rows)
            assert sum(r["true_local"] for r in rows) == round(sum(r["slots"] for r in rows) * (1 - frac))


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_capacity_bounds_received_rows_per_source_rank(request, world):
    for r in _results(request, world):
        for run in r["layers"]:
            for cap in run["rows"]["capacity"]:
                for src, row in enumerate(cap["recv_counts_PL"]):
                    assert max(row) <= cap["capacity_per_source"][src], (cap["policy"], src, row)
                assert cap["y_err"] <= TOL
            assert any(c["num_dropped"] > 0 for c in run["rows"]["capacity"])  # capacity 1.0 did bind


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_mesh_layout(request, world):
    res = _results(request, world)
    n = len(res)
    for r in res:
        lay = r["layout"]
        assert lay["mesh_dims"] == ("dp", "ep") and lay["mesh_shape"] == (n // 2, 2)
        assert lay["ep_ranks"] == [lay["rank"] - lay["ep_rank"] + i for i in range(2)]  # consecutive ranks
        assert lay["edp_ranks"] == [lay["ep_rank"] + 2 * i for i in range(n // 2)]  # same expert shard


@pytest.mark.parametrize("world", ["ep2", "ep4"])
def test_parallel_model_gradients_scale_and_state_dict(request, world):
    for rank, r in enumerate(_results(request, world)):
        m = r["model"]
        assert m["types"] == ["DTensor"]  # FSDP2 manages every parameter
        assert m["loss_err"] <= TOL
        # relative to each gradient's largest entry (they range from 1e-12 to 0.1 here)
        bad = {k: v for k, v in m["grad_err"].items() if not v <= TOL * max(m["grad_scale"][k], 1e-6)}
        assert not bad, f"rank {rank}: gradients differ from the single-process model: {bad}"
        ratio_bad = {k: v for k, v in m["grad_ratio"].items() if abs(v - 1) > 1e-5}
        assert not ratio_bad, f"rank {rank}: gradient scale is off (<g, g_ref>/|g_ref|^2): {ratio_bad}"
        assert abs(m["norm"] - m["ref_norm"]) <= 1e-5 * m["ref_norm"]
        assert max(m["clipped_err"].values()) <= 1e-4  # relative to max_norm
        assert m["state_keys_equal"] and max(m["state_err"].values()) == 0.0


def test_training_on_two_ranks_follows_single_process_trajectory(tmp_path):
    from moe_train.train.trainer import train

    moe = MoEConfig(router="null_experts", num_experts=4, num_null_experts=4, top_k=3, aux_loss_coef=0.01,
                    z_loss_coef=1e-3, expert_bias_rate=1e-3)
    cfg = Config(model=ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2,
                                   num_kv_heads=1, max_seq_len=16, moe=moe),
                 train=TrainConfig(steps=5, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, log_every=100,
                                   grad_clip=0.5),
                 data=DataConfig(num_sequences=32, val_sequences=4),
                 parallel=ParallelConfig(ep=2, global_aux_loss=True, rendezvous_timeout_s=30))
    cfg.train.out_dir = str(tmp_path / "ep2")
    res = W.spawn("train_run", 2, tmp_path, cfg_dict=to_dict(cfg))
    assert not any(r["initialized_after"] for r in res)  # the trainer tore its process groups down
    cfg.parallel = ParallelConfig(ep=1)
    cfg.train.out_dir = str(tmp_path / "single")
    single = train(cfg)
    rows = {name: [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                   if "lm_loss" in r]  # the training steps (not the final evaluation record)
            for name in ("ep2", "single")}
    assert not (tmp_path / "ep2" / "metrics.jsonl.rank1").exists()
    assert len(rows["ep2"]) == len(rows["single"]) == 5
    for a, b in zip(rows["ep2"], rows["single"]):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4, (a["step"], key, a[key], b[key])
    assert abs(res[0]["record"]["val_loss"] - single["val_loss"]) <= 1e-4
    saved = torch.load(tmp_path / "ep2" / "final" / "model.pt", weights_only=True)["model"]
    ref = torch.load(tmp_path / "single" / "final" / "model.pt", weights_only=True)["model"]
    assert list(saved) == list(ref)
    assert max((saved[k] - ref[k]).abs().max().item() for k in ref) <= 1e-4
