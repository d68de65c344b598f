"""Greedy generation for a quick look at a model (no KV cache: every step re-runs the whole window).

Ada-K models generate with the greedy allocator (argmax k) unless ``force_k`` is given. The window is the last
model.max_seq_len tokens. Returns the new token ids and the true experts per token each layer used on them.
Shape legend: S sequence, L layers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from moe_train.eval.scoring import eval_routing
from moe_train.model import MoETransformer


@torch.no_grad()
def greedy_generate(model: MoETransformer, prompt: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = (), device: torch.device = torch.device("cpu"),
                    force_k: Optional[int] = None,
                    stop_fn: Optional[Callable[[list[int]], bool]] = None) -> tuple[list[int], list[list[int]]]:
    """(new token ids, k_per_step [step][layer]): argmax decoding until max_new_tokens, a stop id (kept) or
    ``stop_fn(new ids)`` returning True (e.g. a stop string appeared in the decoded text)."""
    if not prompt:
        raise ValueError("greedy generation needs a non-empty prompt (start it with BOS)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    ids = list(prompt)
    new: list[int] = []
    k_steps: list[list[int]] = []
    stops = set(stop_ids)
    with eval_routing(model, force_k):
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-model.config.max_seq_len:]], dtype=torch.long, device=device)
            logits, plans = model(window, return_plans=True)
            nxt = int(logits[0, -1].argmax())
            k_steps.append([int(p.true_mask_TK[-1].sum()) for p in plans])  # k of the position that predicted it
            ids.append(nxt)
            new.append(nxt)
            if nxt in stops or (stop_fn is not None and stop_fn(new)):
                break
    return new, k_steps
