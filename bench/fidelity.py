"""Method fidelity (issue 15): the compute / quality frontier of every router on the difficulty corpus.

    1. pre-train one tiny top-2 base on the difficulty corpus (moe_train/data/difficulty.py)
    2. from that base, with the same continuation tokens per seed (equal token budgets):
         fixed top-1 .. top-kmax         the base's gate and experts, continued with k experts per token
         AdaMoE (paper setting)          m = 2n null experts, k = 4, aux 0.01 (conversion on load)
         AdaMoE + compute budget         m = n null experts, k = 4, PI controller at several targets
         top-p (Huang et al. 2024)       the base's gate, smallest expert set reaching p, entropy loss 1e-4
    3. Ada-K on the frozen continued top-2 model of the same seed (warm start + PPO) at several penalties
Validation on held-out sequences of the same corpus (the same recall tables): loss, experts per token, each per
difficulty label; whole-model forward FLOPs per token at the measured experts per layer (moe_train/model/flops.py).
Prints one JSON line per run and a summary per goal; writes <out>/fidelity.jsonl and three PNG plots
(--img-dir): validation loss vs FLOPs (the frontier), experts per token by label, loss by label.

    python bench/fidelity.py [--base-steps 1200 --steps 200 --seeds 0 1 2 3 --out runs/fidelity]
    python bench/fidelity.py --plot-only --out runs/fidelity      # re-plot / re-summarise a finished run
Runs whose row is already in <out>/fidelity.jsonl are skipped, so a second call with more --seeds or settings
extends a sweep (the base is trained once).
The defaults are the measured sweep of docs/fidelity.md: 1 base + 4 seeds x 16 runs, about 35 minutes on 2 shared
CPU cores (fp32, one torch thread: with 7 processes on 2 cores, 2 threads per process ran ~10x slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_train.config import Config, load_config
from moe_train.data import get_corpus
from moe_train.data.difficulty import GROUPS, LABELS
from moe_train.eval.report import corpus_report
from moe_train.io.model_file import load_model, save_model
from moe_train.model import build_model
from moe_train.model.flops import forward_flops_per_token

MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.max_seq_len=64", "model.moe.num_experts=8", "model.moe.aux_loss_coef=0.01"]


def common(args, out_dir: Path, seed: int = 0) -> list[str]:
    return [*MODEL, f"train.out_dir={out_dir}", f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
            "train.log_every=100", "train.tensorboard=false", "train.resume=false", f"train.seed={seed}",
            "data.kind=synthetic", "data.corpus=difficulty", f"data.num_sequences={args.num_sequences}",
            f"data.val_sequences={args.val_sequences}"]


def derived_checkpoint(base: Path, path: Path, **moe) -> Path:
    """The base model with its routing settings changed (the same gate and experts), as a model.pt."""
    src = load_model(base)
    model = build_model(dataclasses.replace(src.config, moe=dataclasses.replace(src.config.moe, **moe)))
    model.load_state_dict(src.state_dict())
    return save_model(model, path)


def held_out(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The one validation set of every run (base, every variant, every seed): held-out sequences of the corpus
    (``--eval-seed``, no training seed draws it; the recall tables are the same by construction)."""
    return get_corpus("difficulty").generate(args.eval_sequences, args.seq_len, 64, args.eval_seed)


def row_from(args, name: str, method: str, setting, seed: int, out: Path, top2_flops: float, wall: float) -> dict:
    """One JSON row: the final model of ``out`` on the held-out set (corpus_report: loss, experts per token,
    both per label; Ada-K with its greedy allocator), whole-model forward FLOPs at the measured experts per layer."""
    model = load_model(out / "final" / "model.pt")
    corpus = get_corpus("difficulty")
    tokens, labels = held_out(args)
    batches = ((tokens[i:i + 32, :-1], tokens[i:i + 32, 1:], labels[i:i + 32, 1:]) for i in range(0, len(tokens), 32))
    rep = corpus_report(model, batches, label_names=corpus.labels, label_groups=corpus.groups)
    per_layer = rep["mean_k_per_layer"]
    flops = forward_flops_per_token(model.config, per_layer, args.seq_len)
    by_label = {x: {"k": e["mean_k"], "loss": e["loss"], "tokens": e["tokens"]} for x, e in rep["by_label"].items()}
    groups = {g: {"k": rep[f"mean_k_{g}"], "loss": rep[f"loss_{g}"]} for g in GROUPS}
    return {"bench": "fidelity", "run": name, "method": method, "setting": setting, "seed": seed,
            "val_loss": rep["val_loss"], "val_tokens": rep["tokens"], "experts_per_token": rep["mean_k"],
            "experts_per_layer": per_layer, "flops_per_token": flops, "flops_vs_top2": flops / top2_flops,
            "by_label": by_label, "groups": groups, "wall_s": round(wall, 1)}


def train_run(args, out: Path, name: str, method: str, setting, seed: int, extra: list[str], top2: float) -> dict:
    from moe_train.train.trainer import train

    if name in args.done:  # its row is in <out>/fidelity.jsonl already
        return None
    t0 = time.perf_counter()
    cfg = load_config("configs/tiny_top2.yaml", common(args, out / name, seed) + extra)
    train(cfg)
    return row_from(args, name, method, setting, seed, out / name, top2, time.perf_counter() - t0)


def adak_run(args, out: Path, name: str, penalty: float, seed: int, base: Path, top2: float) -> dict:
    from moe_train.train.adak import train_adak

    if name in args.done:
        return None
    t0 = time.perf_counter()
    cfg: Config = load_config("configs/tiny_adak.yaml", common(args, out / name, seed) + [
        f"train.init_from={base}", "adak.k_min=1", "adak.k_max=4", f"adak.penalty={penalty}",
        f"adak.warm_start_steps={args.adak_warm}", f"adak.ppo_steps={args.adak_ppo}", "adak.lr=1e-2",
        "adak.entropy_coef=1e-2", f"data.seed={77 + seed}"])
    train_adak(cfg)
    return row_from(args, name, "adak", penalty, seed, out / name, top2, time.perf_counter() - t0)


def sweep(args, out: Path, emit) -> None:
    """Every trained run, seeds outermost (each seed's variants back to back), one JSON line each."""
    base_cfg = load_config("configs/tiny_top2.yaml", common(args, out / "base", 0) + [f"train.steps={args.base_steps}"])
    top2 = forward_flops_per_token(base_cfg.model, 2.0, args.seq_len)
    if "base" not in args.done:
        emit(train_run(args, out, "base", "base", 2, 0, [f"train.steps={args.base_steps}"], top2))
    base = out / "base" / "final" / "model.pt"
    for k in range(1, args.kmax + 1):
        derived_checkpoint(base, out / "derived" / f"top{k}.pt", top_k=k, baseline_top_k=2)
    for p in args.top_p:
        derived_checkpoint(base, out / "derived" / f"top_p{p}.pt", router="top_p", top_p=p, baseline_top_k=2)
    for seed in args.seeds:
        cont = [f"train.steps={args.steps}", "train.lr=1.5e-3", "train.warmup_steps=10", f"data.seed={77 + seed}"]
        for k in range(1, args.kmax + 1):
            emit(train_run(args, out, f"top{k}_s{seed}", "topk", k, seed, cont + [
                f"train.init_from={out / 'derived' / f'top{k}.pt'}", f"model.moe.top_k={k}"], top2))
        null = cont + [f"train.init_from={base}", "model.moe.router=null_experts", "model.moe.top_k=4",
                       "model.moe.baseline_top_k=2"]
        emit(train_run(args, out, f"adamoe_s{seed}", "adamoe", "paper m=16 k=4", seed, null + [
            "model.moe.num_null_experts=16"], top2))
        for target in args.budgets:
            emit(train_run(args, out, f"adamoe_b{target}_s{seed}", "adamoe_budget", target, seed, null + [
                "model.moe.num_null_experts=8", "model.moe.aux_loss_coef=0.001",
                f"model.moe.target_true_experts={target}"], top2))
        for p in args.top_p:
            emit(train_run(args, out, f"top_p{p}_s{seed}", "top_p", p, seed, cont + [
                f"train.init_from={out / 'derived' / f'top_p{p}.pt'}", "model.moe.router=top_p",
                f"model.moe.top_p={p}", "model.moe.entropy_loss_coef=1e-4"], top2))



def sweep_adak(args, out: Path, emit) -> None:
    """Ada-K on each seed's continued top-2 model (the train phase's top2_s<seed>), every penalty."""
    base_cfg = load_config("configs/tiny_top2.yaml", common(args, out / "base", 0))
    top2 = forward_flops_per_token(base_cfg.model, 2.0, args.seq_len)
    for seed in args.seeds:
        for penalty in args.adak_penalties:
            emit(adak_run(args, out, f"adak_l{penalty}_s{seed}", penalty, seed,
                          out / f"top2_s{seed}" / "final" / "model.pt", top2))


# ----------------------------------------------------------------------------------------------------------
# summary


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(rows: list[dict]) -> dict:
    """(method, setting) -> seed statistics of loss, FLOPs, group / label figures, and the paired loss difference
    to the same seed's top-2 run (for Ada-K that run is its frozen base), all on the same held-out set."""
    top2 = {r["seed"]: r["val_loss"] for r in rows if r["method"] == "topk" and r["setting"] == 2}
    out: dict = {}
    for r in rows:
        if r["method"] == "base":
            continue
        e = out.setdefault((r["method"], r["setting"]), {"rows": []})
        e["rows"].append(r)
    for (_method, _), e in out.items():
        rs = e["rows"]
        ref = [top2.get(r["seed"]) for r in rs]
        e["val_loss"] = _stats([r["val_loss"] for r in rs])
        e["flops_vs_top2"] = _stats([r["flops_vs_top2"] for r in rs])
        e["experts_per_token"] = _stats([r["experts_per_token"] for r in rs])
        if all(x is not None for x in ref):
            e["loss_vs_top2_pct"] = _stats([100 * (r["val_loss"] / b - 1) for r, b in zip(rs, ref)])
        e["groups"] = {g: {m: statistics.fmean(r["groups"][g][m] for r in rs) for m in ("k", "loss")}
                       for g in rs[0]["groups"]}
        e["by_label"] = {x: {m: statistics.fmean(r["by_label"][x][m] for r in rs) for m in ("k", "loss")}
                         for x in rs[0]["by_label"]}
    return out


def frontier_loss(agg: dict, flops: float) -> float | None:
    """The fixed-k frontier (seed means, piecewise linear in FLOPs) at ``flops``; None outside its range."""
    pts = sorted((e["flops_vs_top2"]["mean"], e["val_loss"]["mean"]) for (m, _), e in agg.items() if m == "topk")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / (x1 - x0)
    return None


def goals(agg: dict) -> list[dict]:
    """One line per adaptive setting and goal (issue 15), measured means with the seed range."""
    lines = []
    for (method, setting), e in sorted(agg.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if method == "topk":
            continue
        g, d = e["groups"], e.get("loss_vs_top2_pct")
        cut = 100 * (1 - e["flops_vs_top2"]["mean"])
        line = {"bench": "fidelity", "goal_of": f"{method} {setting}", "flops_cut_pct": round(cut, 2),
                "loss_vs_top2_pct": d and round(d["mean"], 3),
                "loss_vs_top2_pct_range": d and [round(d["min"], 3), round(d["max"], 3)],
                "experts_per_token": round(e["experts_per_token"]["mean"], 3),
                "k_by_group": {k: round(v["k"], 3) for k, v in g.items()}}
        if method in ("adamoe", "adamoe_budget"):
            line["goal_adamoe_met"] = cut >= 15 and d is not None and d["mean"] <= 0
        if method == "adak":
            expert_cut = 100 * (1 - e["experts_per_token"]["mean"] / 2)
            line["expert_flops_cut_pct"] = round(expert_cut, 2)
            line["goal_adak_met_whole_model"] = cut >= 25 and d is not None and d["mean"] <= 1
            line["goal_adak_met_expert_flops"] = expert_cut >= 25 and d is not None and d["mean"] <= 1
        if method in ("adamoe", "adamoe_budget", "adak", "top_p"):
            for h in ("recall", "computation"):  # the goal: both above trivial and above unpredictable
                line[f"{h}_k_gt_trivial_and_unpredictable"] = g[h]["k"] > max(g["trivial"]["k"],
                                                                               g["unpredictable"]["k"])
        ref = frontier_loss(agg, e["flops_vs_top2"]["mean"])
        line["frontier_loss"] = ref and round(ref, 4)
        line["vs_frontier"] = ref and round(e["val_loss"]["mean"] - ref, 4)
        line["on_or_below_frontier"] = None if ref is None else e["val_loss"]["mean"] <= ref
        lines.append(line)
    return lines


def markdown_table(agg: dict) -> str:
    """The docs table: one row per (method, setting), seed means (loss: mean and seed range)."""
    head = ("| router | setting | seeds | val loss (range) | vs top-2 (paired, range) | FLOPs / top-2 | experts / token "
            "| k: recall / computation / trivial / unpredictable / copy | loss: recall / computation / copy |")
    lines = [head, "|" + "---|" * 9]
    for (method, setting), e in sorted(agg.items(), key=lambda kv: (list(STYLE).index(kv[0][0]), str(kv[0][1]))):
        v, d, g = e["val_loss"], e.get("loss_vs_top2_pct"), e["groups"]
        paired = "" if d is None else f"{d['mean']:+.2f}% ({d['min']:+.2f}, {d['max']:+.2f})"
        lines.append(f"| {method} | {setting} | {v['n']} | {v['mean']:.4f} ({v['min']:.4f}-{v['max']:.4f}) | {paired} "
                     f"| {e['flops_vs_top2']['mean']:.3f} | {e['experts_per_token']['mean']:.2f} | "
                     + " / ".join(f"{g[x]['k']:.2f}" for x in ("recall", "computation", "trivial", "unpredictable",
                                                                "copy"))
                     + " | " + " / ".join(f"{g[x]['loss']:.3f}" for x in ("recall", "computation", "copy")) + " |")
    return "\n".join(lines) + "\n"


def label_table(agg: dict) -> str:
    """Per label: what a second expert buys (loss of top-1 minus top-2) and the experts per token of each adaptive
    setting (seed means)."""
    labels = [x for x in LABELS.values() if x != "structure"]
    keys = sorted((k for k in agg if k[0] != "topk"), key=lambda k: (list(STYLE).index(k[0]), str(k[1])))
    lines = ["| label | loss top-1 - top-2 | " + " | ".join(f"k {m} {s}" for m, s in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    one, two = agg.get(("topk", 1)), agg.get(("topk", 2))
    for x in labels:
        gain = f"{one['by_label'][x]['loss'] - two['by_label'][x]['loss']:+.3f}" if one and two else ""
        lines.append(f"| {x} | {gain} | " + " | ".join(f"{agg[k]['by_label'][x]['k']:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# plots

STYLE = {"topk": ("k", "o", "fixed top-k"), "adamoe": ("tab:red", "s", "AdaMoE (paper setting)"),
         "adamoe_budget": ("tab:orange", "D", "AdaMoE + budget"), "top_p": ("tab:green", "^", "top-p"),
         "adak": ("tab:blue", "v", "Ada-K (frozen top-2)")}


def plot_frontier(agg: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (color, marker, label) in STYLE.items():
        pts = sorted(((e["flops_vs_top2"], e["val_loss"], s) for (m, s), e in agg.items() if m == method),
                     key=lambda t: t[0]["mean"])
        if not pts:
            continue
        xs, ys = [p[0]["mean"] for p in pts], [p[1]["mean"] for p in pts]
        yerr = [[p[1]["mean"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["mean"] for p in pts]]
        ax.errorbar(xs, ys, yerr=yerr, color=color, marker=marker, ls="-" if method == "topk" else "none",
                    capsize=3, label=label)
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(str(p[2]) if method != "adamoe" else "", (x, y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points", color=color)
    ax.set_xlabel("whole-model forward FLOPs per token / top-2 model's")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("difficulty corpus: loss vs compute (seed mean, bars = seed range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_label(agg: dict, path: Path, metric: str, ylabel: str, keys: list) -> None:
    import matplotlib.pyplot as plt

    labels = [x for x in LABELS.values() if x != "structure"]
    keys = [k for k in keys if k in agg]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        vals = [agg[key]["by_label"].get(x, {}).get(metric, float("nan")) for x in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=f"{key[0]} {key[1]}",
               color=STYLE[key[0]][0] if key[0] != "topk" else str(0.15 + 0.2 * (key[1] - 1)))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(agg: dict, img: Path) -> list[Path]:
    img.mkdir(parents=True, exist_ok=True)
    adaptive = sorted((k for k in agg if k[0] != "topk"), key=lambda k: (k[0], str(k[1])))
    fixed = sorted(k for k in agg if k[0] == "topk")
    out = [img / "fidelity_frontier.png", img / "fidelity_experts_by_label.png", img / "fidelity_loss_by_label.png"]
    plot_frontier(agg, out[0])
    plot_by_label(agg, out[1], "k", "true experts per token (mean over layers)", [("topk", 2)] + adaptive)
    plot_by_label(agg, out[2], "loss", "validation loss of the label's tokens", fixed + adaptive)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument("--img-dir", default="docs/img")
    p.add_argument("--base-steps", type=int, default=1200)
    p.add_argument("--steps", type=int, default=200, help="continuation steps of every trained variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-sequences", type=int, default=4096)
    p.add_argument("--val-sequences", type=int, default=16,
                   help="the trainer's own end-of-run validation (the bench reports the held-out set)")
    p.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences every run is validated on")
    p.add_argument("--eval-seed", type=int, default=4321)
    p.add_argument("--kmax", type=int, default=4)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.25, 1.5, 1.75])
    p.add_argument("--top-p", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    p.add_argument("--adak-penalties", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--adak-warm", type=int, default=30)
    p.add_argument("--adak-ppo", type=int, default=80)
    p.add_argument("--phases", nargs="+", choices=("train", "adak"), default=["train", "adak"],
                   help="train: base, fixed top-k, AdaMoE, top-p; adak: Ada-K on each seed's top-2 run (after train)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    p.add_argument("--plot-only", action="store_true", help="summarise and plot <out>/fidelity.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "fidelity.jsonl"
    if not args.plot_only:
        cpu = {"bench": "fidelity", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "dtype": "float32", "args": vars(args)}
        print(json.dumps(cpu), flush=True)

        args.done = set()
        if jsonl.is_file():  # a run whose row exists is not repeated: more seeds / settings extend a sweep
            args.done = {json.loads(line)["run"] for line in jsonl.read_text().splitlines() if line.strip()}

        def emit(row) -> None:
            if row is None:
                return
            print(json.dumps(row), flush=True)
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

        if "train" in args.phases:
            sweep(args, out, emit)
        if "adak" in args.phases:
            sweep_adak(args, out, emit)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    agg = aggregate(rows)
    for line in goals(agg):
        print(json.dumps(line), flush=True)
    (out / "fidelity_table.md").write_text(markdown_table(agg) + "\n" + label_table(agg))
    for path in plots(agg, Path(args.img_dir)):
        print(json.dumps({"bench": "fidelity", "plot": str(path)}), flush=True)


if __name__ == "__main__":
    main()
