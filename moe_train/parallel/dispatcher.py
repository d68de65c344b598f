"""Expert-parallel token dispatch: send each TRUE slot's row to the rank that holds its expert, and back.

Experts are contiguous per rank (rank p holds global experts [p*L, (p+1)*L)), so sorting the true slots by global
expert id (moe_train.kernels.build_permutation) already groups them by destination rank, then local expert:

    counts_E --all_to_all--> recv_counts_PL  (the host sync)   x_TD --permute--> x_ND (rows by rank, then expert)
         --all_to_all_single (uneven)--> x_RD (by source rank, then local expert) --reorder--> by local expert
         --GroupedExperts(counts_L)--> y_RD --reorder back--> --all_to_all_single back--> y_ND
         --unpermute_combine(weights)--> y_TD

Null and unused slots (-1) are never permuted, sent or computed, so rows and bytes scale with the true
assignments. Both all-to-alls are autograd functions whose backward is the reverse exchange with swapped splits,
so the expert weights' gradient on a rank sums the contributions of every ep rank whose tokens used them.
Host syncs per layer call: one. The router's per-expert counts are exchanged first and read once; that read sizes
the receive buffer, the splits and the permutation (build_permutation(num_rows=...) then needs no sync of its own).
The exchange, the splits, the regrouping and the row statistics are parallel/exchange.py::CountExchange, which
Megatron's dispatcher (parallel/megatron/dispatcher.py) uses too.
Shape legend (docs/shapes.md, with its exceptions for N and L):
T tokens on this rank, K slots, D hidden, E global experts, P = ep ranks, L = E/P local experts,
N rows this rank sends (its true assignments), R rows it receives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.parallel.exchange import CountExchange, DispatchStats
from moe_train.parallel.overlap import chunk_order, overlapped_experts, reorder_permutation
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.protocols import Experts


class AllToAllDispatcher:
    """A Dispatcher (routing/protocols.py), as LocalDispatcher: ``__call__(x_TD, plan, experts) -> y_TD``;
    ``experts`` holds only this rank's L = E/ep experts (global ids [ep_rank*L, (ep_rank+1)*L))."""

    def __init__(self, ep_group, num_experts: int, permute_backend: str = "auto", overlap_chunks: int = 1):
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the ep group size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.permute_backend = permute_backend
        self.overlap_chunks = overlap_chunks  # >= 2: all-to-all overlapped with the experts (parallel/overlap.py)
        self.last = DispatchStats()

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts) -> torch.Tensor:
        E, b = self.num_experts, self.permute_backend
        assert experts.num_experts == self.num_local, (experts.num_experts, self.num_local)
        assert plan.expert_idx_TK.shape[0] == x_TD.shape[0]
        # the router's counts: the exchange does not wait for the permutation
        ex = CountExchange.run(plan.counts_E, self.group, self.ep_size, self.ep_rank)
        perm = build_permutation(plan.expert_idx_TK, E, backend=b, num_rows=ex.rows_sent)
        if self.overlap_chunks > 1 and self.ep_size > 1:  # rows permuted straight into chunk-major order
            order_N, _ = chunk_order(ex.send_counts_E, self.overlap_chunks, x_TD.device, plan.counts_E)
            perm = reorder_permutation(perm, order_N)
            y_ND = overlapped_experts(permute(x_TD, perm, backend=b), ex, experts, self.overlap_chunks)
        else:
            x_RD = ex.to_expert_major(ex.dispatch_rows(permute(x_TD, perm, backend=b)))
            y_RD = experts(x_RD, ex.recv_counts_dev_PL.sum(0))
            y_ND = ex.combine_rows(ex.from_expert_major(y_RD))
        self.last = ex.stats(x_TD.shape[1] * x_TD.element_size())
        return unpermute_combine(y_ND, perm, plan.weight_TK, x_TD.shape[0], backend=b)
