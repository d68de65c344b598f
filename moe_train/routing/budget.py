"""Compute-budget control for null-expert routing: hold a target number of TRUE experts per token.

As LongCat-Flash holds ~8 FFN experts of 12 picks with a controlled bias on its zero-computation experts, a PI
controller moves one selection bias b shared by the m null experts of a layer:

    e_s = measured_s - target            (mean true experts per token at step s, this layer, all ranks)
    I_s = I_{s-1} + e_s                  (skipped while b is saturated and e_s pushes further: anti-windup)
    b_s = clamp(kp * e_s + ki * I_s, lo, hi)     (b > 0: nulls win more selections -> fewer true experts)

b enters the selection scores only (p + [expert bias ; b]); the gate weights still come from the unbiased
probabilities, so the controller steers cost without changing how picked experts are mixed.

Anti-windup: conditional integration (integrator clamping) with an output clamp. Scores are probabilities in [0, 1]
plus the expert bias b_E, so once b >= max(b_E) + 1 every null expert outranks every true expert of every token,
and once b <= min(b_E) - 1 none does (``null_bias_limits``): past those limits a larger |b| changes no selection.
Without a guard, a stretch where the target cannot be met (a transient whose load ignores the bias, a target at
the edge of [max(0, k - m), min(k, n)], twin ties that make the response a step) keeps adding the same-signed
error to I, so b runs far past the limit and the controller then needs as many steps of opposite error to come
back: unbounded recovery. Conditional integration stops adding error exactly when the clamped output cannot act
on it, and lets the integral unwind as soon as the error changes sign; so ki * |I| stays within
max(|lo|, |hi|) + kp * max|e|, and after saturation the bias is back inside the limits within about
(hi - lo) / (ki * |e|) steps. It is chosen over back-calculation because it needs no extra gain, and over a bare
clamp of I because the bound then follows the actuator's real range rather than a tuned constant.
The limits are data-independent (exact but loose): in practice the selections stop changing well inside them.
"""

from __future__ import annotations

from typing import Optional

import torch


def null_bias_limits(expert_bias_E: Optional[torch.Tensor],
                     null_offset_Z: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(lo, hi): outside [min(b_E) - 1, max(b_E) + 1] the null bias can no longer change any selection. With fixed
    per-null offsets c_Z (NullExpertRouter.null_expert_bias) the range widens to [min(b_E) - max(c) - 1,
    max(b_E) - min(c) + 1]: a null's score is p + bias + c."""
    lo, hi = -1.0, 1.0
    if expert_bias_E is not None and expert_bias_E.numel():
        lo, hi = float(expert_bias_E.min()) - 1.0, float(expert_bias_E.max()) + 1.0
    if null_offset_Z is not None and null_offset_Z.numel():
        lo, hi = lo - float(null_offset_Z.max()), hi - float(null_offset_Z.min())
    return lo, hi


@torch.no_grad()
def update_null_bias(null_bias: torch.Tensor, integral: torch.Tensor, measured: float, target: float,
                     kp: float, ki: float, lo: float = -1.0, hi: float = 1.0) -> None:
    """One PI step with anti-windup (see the module docstring), in place on the two scalar buffers."""
    assert lo < hi, (lo, hi)
    error = measured - target
    candidate = kp * error + ki * (float(integral) + error)
    # integrate unless the output would be clamped and this error pushes it further into the clamp
    if lo <= candidate <= hi or (candidate > hi and error < 0) or (candidate < lo and error > 0):
        integral.add_(error)
    null_bias.fill_(min(hi, max(lo, kp * error + ki * float(integral))))
