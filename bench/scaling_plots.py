"""The PNG plots of bench/scaling.py from its JSON rows (matplotlib, the `bench` extra)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_ORDER = ("route", "count_exchange", "permute", "token_a2a", "experts", "combine_a2a", "combine")


def _measured(rows, **match):
    return [r for r in rows if r.get("bench") == "scaling" and "ep" in r and all(r[k] == v for k, v in match.items())]


def plot_stages(rows, out: str, T: int = 2048, k: int = 2) -> str:
    base = sorted(_measured(rows, tokens_per_rank=T, k=k, null_share=0.0), key=lambda r: r["ep"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"ep {r['ep']}\nfwd" for r in base] + [f"ep {r['ep']}\nbwd" for r in base]
    cmap = plt.get_cmap("tab10")
    for j, d in enumerate(("fwd", "bwd")):
        for i, r in enumerate(base):
            bottom = 0.0
            for s_i, s in enumerate(STAGE_ORDER):
                v = r["stages_ms"].get(f"{d}_{s}", 0.0)
                ax.bar(j * len(base) + i, v, bottom=bottom, color=cmap(s_i),
                       label=s if (i == 0 and j == 0) else None)
                bottom += v
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms (slowest rank, median)")
    ax.set_title(f"MoE layer stages, T={T} tokens/rank, top-{k}, CPU gloo (shared machine)")
    ax.legend(fontsize=8, ncol=2)
    path = os.path.join(out, "scaling_stages.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weak_scaling(rows, out: str, T: int = 2048, k: int = 2) -> str:
    base = sorted(_measured(rows, tokens_per_rank=T, k=k, null_share=0.0), key=lambda r: r["ep"])
    plan = sorted([r for r in rows if r.get("bench") == "planner" and r.get("curve") == "world"],
                  key=lambda r: r["world"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps = [r["ep"] for r in base]
    thr = [r["tokens_per_s"] for r in base]
    a.errorbar(eps, thr, yerr=[[t - T * r["ep"] / (r["step_ms_max"] / 1e3) for t, r in zip(thr, base)],
                               [T * r["ep"] / (r["step_ms_min"] / 1e3) - t for t, r in zip(thr, base)]],
               marker="o", label="measured tokens/s (all ranks)")
    a.set_xlabel("ep (= ranks, gloo on a shared 2-core CPU)")
    a.set_ylabel("tokens / s")
    a2 = a.twinx()
    a2.plot(eps, [base[0]["step_ms"] / r["step_ms"] for r in base], "s--", color="C1", label="weak-scaling eff.")
    a2.set_ylabel("efficiency (step time ep1 / ep)")
    a2.set_ylim(0, 1.2)
    a.set_title("measured: one MoE layer fwd+bwd, CPU")
    a.legend(loc="upper left", fontsize=8)
    a2.legend(loc="upper right", fontsize=8)
    worlds = [r["world"] for r in plan]
    b.plot(worlds, [r["tokens_per_s_per_gpu"] for r in plan], "o-", label="predicted tokens/s per GPU")
    b.set_xscale("log", base=2)
    b.set_xticks(worlds, [str(w) for w in worlds])
    b.set_xlabel("H100s (Mixtral-8x22B AdaMoE config, ep 8)")
    b.set_ylabel("tokens / s / GPU")
    b2 = b.twinx()
    b2.plot(worlds, [r["tokens_per_s_per_gpu"] / plan[0]["tokens_per_s_per_gpu"] for r in plan], "s--", color="C1",
            label="weak-scaling eff. vs 8")
    b2.set_ylim(0, 1.2)
    b.set_title("planner (roofline, serial terms)")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="lower right", fontsize=8)
    path = os.path.join(out, "scaling_weak.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_null_share(rows, out: str, T: int = 2048, k: int = 2) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ep in sorted({r["ep"] for r in _measured(rows)}):
        rs = sorted(_measured(rows, tokens_per_rank=T, k=k, ep=ep), key=lambda r: r["null_share"])
        if len(rs) < 2:
            continue
        a.plot([r["null_share"] for r in rs], [r["step_ms"] / rs[0]["step_ms"] for r in rs], "o-",
               label=f"time, ep {ep}")
        if ep > 1:
            a.plot([r["null_share"] for r in rs],
                   [r["bytes_sent_remote_all_ranks"] / rs[0]["bytes_sent_remote_all_ranks"] for r in rs], "x:",
                   label=f"a2a bytes, ep {ep}")
    a.plot([0, 0.5], [1, 0.5], "k--", lw=0.8, label="true assignments")
    a.set_xlabel("null share of the top-k picks")
    a.set_ylabel("relative to top-k (null share 0)")
    a.set_title(f"measured: T={T}/rank, k={k}, CPU gloo")
    a.legend(fontsize=8)
    plan = sorted([r for r in rows if r.get("bench") == "planner" and r.get("curve") == "true_experts"],
                  key=lambda r: r["true_experts_per_token"])
    ks = [r["true_experts_per_token"] for r in plan]
    b.plot(ks, [r["a2a_bytes_per_gpu"] / 1e9 for r in plan], "x:", label="all-to-all GB per GPU per step")
    b.set_xlabel("true experts per token (Mixtral-8x22B AdaMoE, 16 H100)")
    b.set_ylabel("GB")
    b2 = b.twinx()
    b2.plot(ks, [r["step_s"] for r in plan], "o-", color="C1", label="step time (s)")
    b2.plot(ks, [r["compute_s"] for r in plan], "^-", color="C2", label="compute term (s)")
    b2.set_ylabel("s")
    b.set_title("planner")
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="lower right", fontsize=8)
    path = os.path.join(out, "scaling_null_share.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(rows, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    return [plot_stages(rows, out), plot_weak_scaling(rows, out), plot_null_share(rows, out)]
