"""A DeepSpeed checkpoint resumes at another world size and ep (train/deepspeed_engine.py, io/deepspeed_view.py).

The writer: AdaMoE null experts, 2 ranks, ep 2, ZeRO stage 2, 4 steps with a checkpoint at step 2 (the global aux
loss: the same objective at every layout). From its step-2 checkpoint, steps 3-4 are trained again at 4 ranks
(dp 2 x ep 2, ZeRO stage 1) and at 2 ranks with ep 1 (ZeRO stage 2); each must repeat the uninterrupted run's
losses within 1e-5 (fp32: only the reduction order differs) and end with the same fp32 masters and AdamW moments
(their step-4 views, compared by full name). The writer's view itself is checked against an independent
implementation: the FSDP2 engine's DCP checkpoint of the same run at step 2 (masters, exp_avg, exp_avg_sq, step).
ZeRO stage 3 (ep 1): written at 2 ranks, resumed at 4, and its view against the same FSDP2 checkpoint. A launch
the view cannot serve is refused before anything is loaded, with a message naming the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'moe_train[deepspeed]')")

from test_deepspeed import KEYS, base_config, engine, rows  # noqa: E402

from moe_train.io.deepspeed_view import INDEX, VIEW  # noqa: E402

import deepspeed_workers as DW  # noqa: E402
import ep_workers as W  # noqa: E402

TOL = 1e-5
CKPT = Path("checkpoints") / "step_00000002"


def config(**train):
    cfg = base_config("null", ep=2, checkpoint_every=2, **train)
    cfg.parallel.global_aux_loss = True  # the per-rank aux loss would be another objective at another layout
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsr")
    writer = out / "writer"
    resume = dict(train__resume_from=str(writer / CKPT))
    jobs2 = [engine(config(steps=2), out, "fsdp"), engine(config(), out, "writer", stage=2),
             engine(config(), out, "ep1", stage=2, parallel__ep=1, **resume),
             engine(config(), out, "writer3", stage=3, parallel__ep=1)]  # ZeRO-3: ep 1 only
    res2 = W.spawn(DW.train_jobs, 2, out, cfg_dicts=jobs2)
    # ZeRO stage 1 reads the view as stage 2 does (the same optimizer class); the stage change is let through
    jobs4 = [engine(config(), out, "dp2ep2", stage=1, train__resume_allow_changes=["deepspeed.stage"], **resume),
             engine(config(), out, "zero3_dp4", stage=3, parallel__ep=1,
                    train__resume_from=str(out / "writer3" / CKPT))]
    res4 = W.spawn(DW.train_jobs, 4, out, cfg_dicts=jobs4)
    return {"out": out, "res": res2 + res4}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 reduction order, relative to the reference tensor's scale (AdamW's second moments are
    ~1e-10 .. 4e-4 here: a fixed atol would pass anything)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12)


def full_view(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """kind -> full name -> full tensor, assembled from every rank's fragments (the test reads them all)."""
    folder = ckpt / VIEW
    index = json.loads((folder / INDEX).read_text())
    out: dict[str, dict[str, torch.Tensor]] = {}
    kinds = ["param", *index["optimizer_keys"]]
    for kind in kinds:
        out[kind] = {n: torch.full((int(torch.tensor(r["shape"]).prod()),), float("nan"))
                     for n, r in index["params"].items()}
    files = {}
    for name, start, numel, fname, step in index["fragments"]:
        data = files.setdefault(fname, torch.load(folder / fname, weights_only=True))
        for kind in kinds:
            out[kind][name][start:start + numel] = data[f"{kind}/{name}@{start}"]
        out.setdefault("step", {})[name] = torch.tensor(step)
    for kind in kinds:
        out[kind] = {n: t.view(index["params"][n]["shape"]) for n, t in out[kind].items()}
        assert not any(t.isnan().any() for t in out[kind].values())  # the fragments cover every element
    return out


def test_no_errors(runs):
    errors = [r["errors"] for r in runs["res"]]
    assert errors == [[None] * 4] * 2 + [[None] * 2] * 4, errors


@pytest.mark.parametrize("writer, name", [("writer", "dp2ep2"), ("writer", "ep1"), ("writer3", "zero3_dp4")])
def test_resumed_at_another_layout_repeats_steps_3_4(runs, writer, name):
    out = runs["out"]
    full, resumed = rows(out, writer), rows(out, name)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:]):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(b[k])), (name, a["step"], k, a[k], b[k])
    # the final state: masters and moments of every parameter, by full name
    ref = full_view(out / writer / "checkpoints" / "step_00000004")
    got = full_view(out / name / "checkpoints" / "step_00000004")
    assert set(got) == set(ref) == {"param", "exp_avg", "exp_avg_sq", "step"}
    for kind in ref:
        assert set(got[kind]) == set(ref[kind])
        for n in ref[kind]:
            assert close(got[kind][n], ref[kind][n]), (name, kind, n)
    assert all(float(s) == 4 for s in got["step"].values())


@pytest.mark.parametrize("writer", ["writer", "writer3"])
def test_writer_view_equals_fsdp_checkpoint(runs, writer):
    """The view's full tensors at step 2 (ZeRO-2 at ep 2, ZeRO-3 at ep 1) against the FSDP2 run's DCP checkpoint
    (ep 2, converted to one torch file; the global aux loss makes ep 1 and 2 the same objective)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = runs["out"]
    view = full_view(out / writer / CKPT)
    if not (out / "fsdp.pt").exists():
        dcp_to_torch_save(out / "fsdp" / CKPT, out / "fsdp.pt")
    ref = torch.load(out / "fsdp.pt", weights_only=False)
    model, state = ref["model"], ref["optim"]["state"]
    assert set(view["param"]) == {k for k in state}  # every trainable parameter, under the same full names
    for n in view["param"]:
        assert close(view["param"][n], model[n].float()), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert close(view[k][n], state[n][k]), (n, k)
        assert float(view["step"][n]) == float(state[n]["step"]) == 2


def test_a_model_the_view_cannot_serve_is_refused_before_loading(runs):
    """Another number of experts (let through the config check with train.resume_allow_changes): the view's own
    check names the parameters, before anything is loaded (the engine calls it first)."""
    from moe_train.io.deepspeed_view import ViewError, check_view, read_index
    from moe_train.model import MoETransformer
    from moe_train.parallel.distributed import ParallelContext

    ckpt = runs["out"] / "writer" / CKPT
    cfg = config()
    check_view(ckpt, read_index(ckpt), MoETransformer(cfg.model), ParallelContext())  # the same model
    cfg.model.moe.num_experts = 8
    with pytest.raises(ViewError, match=r"trainable parameters \(full names and shapes\) differ: .*experts\.w_down: "
                                        r"\[4, 16, 16\] in the checkpoint, \[8, 16, 16\] now"):
        check_view(ckpt, read_index(ckpt), MoETransformer(cfg.model), ParallelContext())


def test_a_checkpoint_without_view_is_refused_at_another_layout_before_the_model_is_built(runs, tmp_path):
    """A checkpoint without a view (an older moe_train's) resumes at its own layout only; the preflight / resume
    check says so before anything is built (train/fingerprint.py check_resume_layout, DeepSpeedEngine.check_resume_layout); the writer's passes."""
    import shutil

    from moe_train.config import Config, from_dict
    from moe_train.train.fingerprint import ResumeConfigMismatch, check_resume_launch

    ckpt = tmp_path / "step_00000002"
    shutil.copytree(runs["out"] / "writer" / CKPT, ckpt, ignore=shutil.ignore_patterns(VIEW))
    stored = torch.load(ckpt / "trainer.pt", weights_only=False)["config"]
    cfg = from_dict(Config, {k: v for k, v in stored.items() if k != "launch"})  # the writer's own config
    check_resume_launch(ckpt, cfg, world_size=2, ep_size=2)
    with pytest.raises(ResumeConfigMismatch, match=r"at 4 ranks with parallel.ep=2: it was written by 2 ranks with "
                                                   r"parallel.ep=2 .*without the layout-free view"):
        check_resume_launch(ckpt, cfg, world_size=4, ep_size=2)
    check_resume_launch(runs["out"] / "writer" / CKPT, cfg, world_size=4, ep_size=2)  # with its view: allowed


@pytest.mark.parametrize("change, match", [
    (["model.moe.norm_topk_prob=false"], "Mixtral checkpoint cannot express norm_topk_prob=False"),
    (["model.family=qwen3_moe", "model.shared_expert_intermediate_size=16"],
     "Qwen3-MoE checkpoint cannot express a shared"),
])
def test_export_hf_the_family_cannot_express_is_refused_at_start_under_deepspeed(tmp_path, capsys, change, match):
    """train.export_hf under parallel.engine: deepspeed: the command line's preflight (moe_train/preflight.py
    check_export_hf, engine-independent) refuses before process groups, model or out_dir exist, not after training."""
    from moe_train.cli import main

    sets = ["parallel.engine=deepspeed", "deepspeed.stage=2", "parallel.ep=1", "train.export_hf=true",
            f"train.out_dir={tmp_path / 'run'}", *change]
    config_path = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_adamoe.yaml")
    assert main(["train", "--config", config_path, *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "train.export_hf: true, but the trained model cannot be exported" in err and match in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
