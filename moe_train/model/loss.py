"""Training objective: next-token cross-entropy plus the weighted balancing terms of every MoE layer.

Shape legend: B batch, S sequence, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_train.config import MoEConfig
from moe_train.routing import RoutingPlan

IGNORE_INDEX = -100


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE_INDEX (labels are already shifted)."""
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def routing_losses(plans: list[RoutingPlan], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Sum over layers of the aux and z terms, with the config's coefficients applied (alpha * sum_layers L), and
    the top-p router's entropy ("dynamic") loss, beta * sum_layers L_d (0 for the other routers)."""
    aux = torch.stack([p.aux_loss for p in plans]).sum()
    z = torch.stack([p.z_loss for p in plans]).sum()
    entropy = [p.extras["entropy_loss"] for p in plans if "entropy_loss" in p.extras]
    entropy_loss = cfg.entropy_loss_coef * torch.stack(entropy).sum() if entropy else torch.zeros_like(aux)
    return {"aux_loss": cfg.aux_loss_coef * aux, "z_loss": cfg.z_loss_coef * z, "entropy_loss": entropy_loss}
