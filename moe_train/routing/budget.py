"""Compute-budget control for null-expert routing: hold a target number of TRUE experts per token.

As LongCat-Flash holds ~8 FFN experts of 12 picks with a controlled bias on its zero-computation experts, a PI
controller moves one selection bias b shared by the m null experts of a layer:

    e_s = measured_s - target            (mean true experts per token at step s, this layer, all ranks)
    I_s = I_{s-1} + e_s
    b_s = kp * e_s + ki * I_s            (b > 0: nulls win more selections -> fewer true experts)

b enters the selection scores only (p + [expert bias ; b]); the gate weights still come from the unbiased
probabilities, so the controller steers cost without changing how picked experts are mixed.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_null_bias(null_bias: torch.Tensor, integral: torch.Tensor, measured: float, target: float,
                     kp: float, ki: float) -> None:
    """One PI step, in place on the two scalar buffers."""
    error = measured - target
    integral.add_(error)
    null_bias.fill_(kp * error + ki * float(integral))
