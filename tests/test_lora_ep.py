"""LoRA on the stacked experts under expert parallelism: every per-expert tensor (base weights and LoRA adapters
alike) travels with its expert through sharding, FSDP2, gathering, DCP checkpoints and the final / HF export.

  * the parallelized tiny LoRA model (E = 4, nonzero B matrices, routers + adapters trainable) on 2 ranks (ep=2)
    and 4 ranks (dp=2 x ep=2): losses, full gradients and the gathered state after 2 AdamW steps equal one process
    on the global batch (fp32, 1e-5). LoRA rank 3 takes the per-expert loop GEMM, rank 4 torch._grouped_mm;
  * the trainer with the CLI's LoRA setting (tiny_adamoe from a top-2 checkpoint, LoRA rank 16 on attention +
    experts) on 2 ranks with ep=2: trajectory, final (merged) model.pt and HF export equal one process (1e-4);
  * its DCP checkpoints reshard: ep=2 -> 1 process and 1 process -> ep=2 continue the same losses (1e-4).
Rank-side code: tests/lora_ep_workers.py (spawned with tests/ep_workers.py's helpers).
"""

import json
import os
from pathlib import Path

import pytest
import torch

import ep_workers as W
import lora_ep_workers as LW

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny_adamoe.yaml")
TOL = 1e-5
TRAIN_TOL = 1e-4
STEPS, CKPT_STEP = 4, 2


@pytest.fixture(scope="module")
def dp2_ep2(tmp_path_factory):
    return {"ranks": W.spawn(LW.model_suite, 4, tmp_path_factory.mktemp("lora_dp2ep2"), ep=2, lora_rank=4)}


# the 2-rank model check (ep=2, LoRA rank 3) runs in the trainer fixture's spawn: one spawn per world size
@pytest.mark.parametrize("world", ["trained", "dp2_ep2"], ids=["ep2_rank3", "dp2_ep2_rank4"])
def test_lora_model_matches_single_process(request, world):
    res = [r["model"] for r in request.getfixturevalue(world)["ranks"]]
    assert {r["ep_rank"] for r in res} == {0, 1}  # both expert blocks, including the one at offset E/2
    for rank, r in enumerate(res):
        assert r["num_trainable_expert_tensors"] == 12  # 2 layers x lora_{gate,up,down}_{A,B}
        assert max(r["loss_err"]) <= TOL, f"rank {rank}: loss per step differs: {r['loss_err']}"
        bad = {k: v for k, v in r["grad_err"].items() if not v <= TOL * max(r["grad_scale"][k], 1e-3)}
        assert not bad, f"rank {rank}: full gradients differ from the single-process model: {bad}"
        assert r["state_keys_equal"]
        bad = {k: v for k, v in r["state_err"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: state after {LW.STEPS} AdamW steps differs: {bad}"
        # every stacked tensor of the experts module holds the rank's own 2 of the 4 experts
        assert set(r["local_experts"]) == {f"w_{n}" for n in ("gate", "up", "down")} | {
            f"lora_{n}_{m}" for n in ("gate", "up", "down") for m in "AB"}
        assert set(r["local_experts"].values()) == {2}, r["local_experts"]


# ----------------------------------------------------------------------------------------------------------
# the trainer: the CLI's LoRA command in miniature, its final model / HF export and its DCP checkpoints


def _overrides(out_dir: Path, ep: int, base: Path, *extra: str) -> list[str]:
    return ["train.steps=4", "train.batch_size=4", "train.seq_len=32", "data.num_sequences=32",
            "data.val_sequences=4", "train.warmup_steps=1", "train.log_every=100", "train.tensorboard=false",
            f"train.init_from={base}", "train.lora_rank=16", "train.lora_targets=[attention,experts]",
            'train.trainable=["router\\\\.","lora_"]', "train.export_hf=true",
            f"train.checkpoint_every={CKPT_STEP}", "train.keep_last=0",
            "parallel.global_aux_loss=true",  # the same objective at every world size
            f"parallel.ep={ep}", "parallel.rendezvous_timeout_s=30", f"train.out_dir={out_dir}", *extra]


def _ckpt(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / f"step_{CKPT_STEP:08d}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run folders (single, ep2: full runs; ep2_from_single / single_from_ep2: resumed from the other's step-2
    checkpoint) and, under "ranks", the 2-rank spawn's results (its model check with LoRA rank 3 included)."""
    from moe_train.config import ModelConfig, MoEConfig, load_config
    from moe_train.io.model_file import save_model
    from moe_train.model import build_model
    from moe_train.train.trainer import train

    tmp = tmp_path_factory.mktemp("lora_train")
    # the base: an (untrained) top-2 model shaped like configs/tiny_top2.yaml; init_from adds the null experts
    torch.manual_seed(0)
    moe = MoEConfig(router="topk", num_experts=8, top_k=2, aux_loss_coef=0.01)
    base = save_model(build_model(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                                              num_heads=4, num_kv_heads=2, max_seq_len=256, moe=moe)),
                      tmp / "base.pt")
    dirs = {name: tmp / name for name in ("single", "ep2", "ep2_from_single", "single_from_ep2")}
    train(load_config(CONFIG, _overrides(dirs["single"], 1, base)))
    ranks = W.spawn(LW.model_and_train_suite, 2, tmp, lora_rank=3, config_path=CONFIG, runs=[
        ("ep2", _overrides(dirs["ep2"], 2, base)),
        ("ep2_from_single", _overrides(dirs["ep2_from_single"], 2, base,
                                       f"train.resume_from={_ckpt(dirs['single'])}"))])
    train(load_config(CONFIG, _overrides(dirs["single_from_ep2"], 1, base, f"train.resume_from={_ckpt(dirs['ep2'])}")))
    return {**dirs, "ranks": ranks}


def _trajectory(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "lm_loss" in r}


def _hf_tensors(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(str(hf_dir / f)))
    return out


def _max_err(a: dict, b: dict) -> dict:
    assert list(a) == list(b) or sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in b}


def test_trainer_lora_on_experts_ep2_matches_single_process(trained):
    a, b = _trajectory(trained["ep2"]), _trajectory(trained["single"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in b:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= TRAIN_TOL, (step, key, a[step][key], b[step][key])
    saved = torch.load(trained["ep2"] / "final" / "model.pt", weights_only=True)["model"]
    ref = torch.load(trained["single"] / "final" / "model.pt", weights_only=True)["model"]
    assert not any(".lora_" in k for k in saved)  # the final model is the merged, plain model
    err = _max_err(saved, ref)
    assert max(err.values()) <= TRAIN_TOL, {k: v for k, v in err.items() if v > TRAIN_TOL}
    hf, hf_ref = _hf_tensors(trained["ep2"] / "hf"), _hf_tensors(trained["single"] / "hf")
    assert hf_ref and any("experts" in k for k in hf_ref)
    err = _max_err(hf, hf_ref)
    assert max(err.values()) <= TRAIN_TOL, {k: v for k, v in err.items() if v > TRAIN_TOL}


@pytest.mark.parametrize("resumed, source", [("single_from_ep2", "ep2"), ("ep2_from_single", "single")])
def test_lora_expert_checkpoint_reshards_between_world_sizes(trained, resumed, source):
    # the run resumed at the other world size continues the trajectory of the run that wrote the checkpoint: the
    # LoRA expert tensors and their Adam moments were saved with their global shape and resharded on load
    a, b = _trajectory(trained[resumed]), _trajectory(trained[source])
    assert sorted(a) == list(range(CKPT_STEP + 1, STEPS + 1))
    for step in a:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= TRAIN_TOL, (step, key, a[step][key], b[step][key])
