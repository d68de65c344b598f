"""A plan as a human-readable table (the JSON form is the plan dict itself)."""

from __future__ import annotations

GIB = 2**30


def _gb(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def _ms(x: float) -> str:
    return f"{x * 1e3:9.1f} ms"


def _startup_lines(plan: dict) -> list[str]:
    """One line per phase outside the steady step: rank 0's GPU, its node's host, what peaks."""
    return [f"  {name:<20} {_gb(p['gpu'])}  host/node {_gb(p['host_per_node']).strip()}  ({p['what']})"
            for name, p in plan["startup"].items()]


def _active_line(plan: dict) -> str:
    """Active parameters per token: at the expected true experts and at the top-k baseline (the published figure
    of a family), with and without the embedding table (publishers differ: planner/plan.py parameter_facts)."""
    a, b = plan["params_active_per_token"], plan["params_active_per_token_topk_baseline"]
    return (f"active per token: {a / 1e9:.2f} B at {plan['tokens']['k_expected']:g} true experts "
            f"({plan['params_active_per_token_no_embedding'] / 1e9:.2f} B without the embedding); top-k baseline "
            f"{b / 1e9:.2f} B ({plan['params_active_per_token_topk_baseline_no_embedding'] / 1e9:.2f} B)")


def _bottleneck_lines(b: dict) -> list[str]:
    lines = ["", f"step bounded by: {b['what']} ({b['term']}, {100 * b['share_of_serial']:.0f} % of the serial step)",
             "what would lower it:"]
    for r in b["remedies"]:
        lines.append(f"  [{'implemented' if r['implemented'] else 'NOT implemented'}] {r['remedy']}")
    return lines


def render(plan: dict) -> str:
    m, t, tb, tok, fl = plan["memory"], plan["time"], plan["time_topk_baseline"], plan["tokens"], plan["flops"]
    tr, trb = plan["traffic"], plan["traffic_topk_baseline"]
    lines = [
        f"plan: {plan['job']} job, {plan['config_model']}",
        f"cluster: {plan['world']} x {plan['gpu']} ({plan['nodes']} node(s) x {plan['gpus_per_node']}), "
        f"mesh dp {plan['dp']} x ep {plan['ep']}, {plan['precision']}, activation checkpointing "
        f"{'on' if plan['activation_checkpointing'] else 'off'}",
        f"parameters: {plan['params_total'] / 1e9:.2f} B, trainable {plan['params_trainable'] / 1e6:.2f} M; "
        f"base architecture {plan['params_base'] / 1e9:.2f} B (without adapters, null gates, allocators)",
        _active_line(plan),
        f"micro-batch per rank: {tok['micro_batch_seqs']} seq = {tok['tokens']} tokens, {tok['micro_batches']} "
        f"forward(s) per step; true experts/token {tok['k_expected']:g} (top-k baseline {tok['k_baseline']:g}; "
        f"memory sized for {tok['k_worst']:g})",
        "",
        "per-GPU memory (rank 0)",
    ]
    for key in ("params", "buffers", "optimizer", "gradients", "gathered_params", "activations",
                "backward_transient", "reduce_buffers"):
        if key in m and m[key]:
            lines.append(f"  {key:<20} {_gb(m[key])}")
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines += [f"  {'steady step peak':<20} {_gb(m['peak'])}  at {m['peak_at']}",
              f"  worst-case routing  {_gb(plan['memory_worst_case']['peak'])}  "
              f"({'fits' if plan['fits_worst_case'] else 'does not fit'}; {plan['memory_worst_case']['bound']})",
              *_startup_lines(plan),
              f"  {'peak (all phases)':<20} {_gb(plan['peak_gpu'])}  at {plan['peak_gpu_at']}  -> {verdict} in "
              f"{_gb(plan['usable_bytes'])} usable ({plan['gpu']}, 90 %)",
              f"  {'host per node':<20} {_gb(plan['peak_host_per_node'])}  (largest phase; tensors only)",
              "",
              f"per step, per GPU            {'this config':>14} {'top-k baseline':>16}",
              f"  forward FLOPs/token        {fl['forward_per_token'] / 1e9:11.2f} G "
              f"{fl['forward_per_token_topk_baseline'] / 1e9:13.2f} G   (flops vs top-k {fl['flops_vs_topk']:.3f})",
              f"  all-to-all NVLink          {tr['a2a_intra'] / 1e9:11.2f} GB {trb['a2a_intra'] / 1e9:13.2f} GB",
              f"  all-to-all InfiniBand      {tr['a2a_inter'] / 1e9:11.2f} GB {trb['a2a_inter'] / 1e9:13.2f} GB",
              f"  FSDP NVLink / InfiniBand   {tr['fsdp_intra'] / 1e9:7.2f} / {tr['fsdp_inter'] / 1e9:.2f} GB "
              f"(all-gather {tr['detail']['fsdp_all_gather_bytes'] / 1e9:.2f} GB, reduce-scatter "
              f"{tr['detail']['fsdp_reduce_scatter_bytes'] / 1e9:.2f} GB)"]
    for name, secs in t["terms"].items():
        lines.append(f"  time {name:<21} {_ms(secs)} {_ms(tb['terms'][name])}")
    lines += [f"  step time (serial)         {_ms(t['serial_s'])} {_ms(tb['serial_s'])}",
              f"  roofline (full overlap)    {_ms(t['roofline_s'])} {_ms(tb['roofline_s'])}",
              f"  bounded by                 {t['bound_by']:>12} {tb['bound_by']:>16}",
              f"  MFU (serial)               {100 * t['mfu']:11.1f} % {100 * tb['mfu']:13.1f} %"]
    lines += _bottleneck_lines(plan["bottleneck"])
    if plan.get("suggestions"):
        lines += ["", "what would fit:"]
        for s in plan["suggestions"]:
            if "error" in s:
                lines.append(f"  {s['change']}: not applicable ({s['error']})")
            else:
                lines.append(f"  {s['change']:<60} peak {_gb(s['peak_bytes'])} {'fits' if s['fits'] else 'no'}")
    return "\n".join(lines)
