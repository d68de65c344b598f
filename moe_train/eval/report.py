"""The one validation report: loss, true experts per token (overall, per layer, per difficulty label), FLOPs vs
top-k, over held-out batches. The trainer's periodic and final validation, Ada-K's validation and
`moe-train eval --difficulty` all call ``corpus_report``; ``validation_metrics`` renames its figures to the
trainer's ``val_*`` metrics.

Accumulation is in float64 over every target token; the experts a token used at position s are set against the
difficulty label of its target (position s + 1), i.e. of the prediction made there.
Shape legend: B batch, S sequence, V vocab, T = B*S tokens, L layers.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from moe_train.data import EASY_LABELS, HARD_LABELS, LABELS
from moe_train.eval.scoring import KStats, eval_routing, flops_fields
from moe_train.model import MoETransformer


@torch.no_grad()
def corpus_report(model: MoETransformer, batches: Iterable, device: torch.device = torch.device("cpu"),
                  force_k: Optional[int] = None, label_names: Optional[dict] = None,
                  autocast: bool = False, label_groups: Optional[dict] = None) -> dict:
    """Validation loss, mean k overall / per layer / per difficulty label (with each label's loss), FLOPs vs top-k.

    ``batches`` yields (inputs_BS, targets_BS, labels_BS or None); labels are the difficulty of each target token,
    named by ``label_names`` and averaged over ``label_groups`` (name -> label ids); both default to the mixed
    corpus's (moe_train.data.LABELS, hard / easy), a Corpus (moe_train/data/corpora.py) carries its own.
    ``autocast``: run the forward under bf16 autocast (the training precision of an unsharded bf16 run); the loss
    is taken in fp32 either way."""
    stats = KStats(model.config.num_moe_layers)
    nll_sum, n, seq_len = 0.0, 0, 0
    with eval_routing(model, force_k):
        for inputs, targets, labels in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits, plans = model(inputs, return_plans=True)
            nll_T = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    reduction="none")
            mask_T = torch.ones(targets.numel(), dtype=torch.bool)
            stats.add(plans, mask_T, None if labels is None else labels.reshape(-1), nll_T)
            nll_sum += float(nll_T.double().sum())
            n += targets.numel()
            seq_len = inputs.shape[1]
    rep = {"val_loss": nll_sum / max(n, 1), "tokens": n, **stats.summary()}
    rep.update(flops_fields(model, rep["mean_k_per_layer"], seq_len))
    if stats.groups:
        groups = {"hard": HARD_LABELS, "easy": EASY_LABELS} if label_groups is None else label_groups
        rep.update(_by_label(stats, LABELS if label_names is None else label_names, groups))
    return rep


def _by_label(stats: KStats, names: dict, groups: dict) -> dict:
    """Loss and mean k per difficulty label, and the mean k and loss of each group of labels (``mean_k_<group>``,
    ``loss_<group>``, over the group's tokens)."""
    out = {"by_label": {names.get(g, str(g)): {"tokens": count, "loss": loss / count, **KStats._summary(sum_L, count)}
                        for g, (sum_L, count, loss) in sorted(stats.groups.items())}}
    for tag, group in groups.items():
        present = [stats.groups[g] for g in group if g in stats.groups]
        if present:
            count = sum(e[1] for e in present)
            out[f"mean_k_{tag}"] = KStats._summary(sum(e[0] for e in present), count)["mean_k"]
            out[f"loss_{tag}"] = sum(e[2] for e in present) / count
    return out


def validation_metrics(rep: dict) -> dict:
    """A ``corpus_report`` under the trainer's metric names (metrics.jsonl, TensorBoard); {} for no tokens."""
    if not rep["tokens"]:
        return {}
    out = {"val_loss": rep["val_loss"], "val_true_experts_per_token": rep["mean_k"],
           "val_true_experts_per_layer": rep["mean_k_per_layer"], "val_flops_vs_topk": rep["flops_vs_topk"]}
    if "by_label" in rep:
        out["val_true_experts_by_label"] = {name: entry["mean_k"] for name, entry in rep["by_label"].items()}
        out["val_loss_by_label"] = {name: entry["loss"] for name, entry in rep["by_label"].items()}
        out["val_label_tokens"] = {name: entry["tokens"] for name, entry in rep["by_label"].items()}
    return out
