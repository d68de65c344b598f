"""Expert-parallel token dispatch: send each TRUE slot's row to the rank that holds its expert, and back.

Experts are contiguous per rank (rank p holds global experts [p*L, (p+1)*L)), so sorting the true slots by global
expert id (moe_train.kernels.build_permutation) already groups them by destination rank, then local expert:

    counts_E --all_to_all--> recv_counts_PL  (the host sync)   x_TD --permute--> x_ND (rows by rank, then expert)
         --all_to_all_single (uneven)--> x_RD (by source rank, then local expert) --reorder--> by local expert
         --GroupedExperts(counts_L)--> y_RD --reorder back--> --all_to_all_single back--> y_ND
         --unpermute_combine(weights)--> y_TD

Phases (as Megatron-Core's route -> dispatch -> experts -> combine), driven by model/moe_layer.py::MoELayer:

    dispatch(x_TD, plan) -> DispatchState   count exchange (the host sync), permutation, ISSUE the row exchange
    ... the layer computes the shared expert here, while the rows travel
    run_experts(state, experts)             wait, grouped experts, ISSUE the combine exchange
    ... the layer computes the identity / constant null term here, while the results travel back
    combine(state) -> y_TD                  wait, weighted sum of each token's rows

``__call__`` runs the three with nothing between (the Dispatcher protocol). With parallel.a2a_overlap_chunks >= 2
the exchange is cut into chunks (parallel/overlap.py): dispatch issues chunk 0, run_experts pipelines the rest.
Null and unused slots (-1) are never permuted, sent or computed, so rows and bytes scale with the true
assignments. The exchanges are functional collectives (parallel/collectives.py: traceable by torch.compile) in
autograd functions whose backward is the reverse exchange with swapped splits (parallel/exchange.py), so the expert
weights' gradient on a rank sums the contributions of every ep rank whose tokens used them.
Host syncs per layer call: one. The router's per-expert counts are exchanged first and read once; that read sizes
the receive buffer, the splits and the permutation (build_permutation(num_rows=...) then needs no sync of its own).
The exchange, the splits, the regrouping and the row statistics are parallel/exchange.py::CountExchange, which
Megatron's dispatcher (parallel/megatron/dispatcher.py) uses too.
Shape legend (docs/shapes.md, with its exceptions for N and L):
T tokens on this rank, K slots, D hidden, E global experts, P = ep ranks, L = E/P local experts,
N rows this rank sends (its true assignments), R rows it receives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moe_train.kernels.permute import Permutation, build_permutation, permute, unpermute_combine
from moe_train.parallel.exchange import CountExchange, DispatchStats
from moe_train.parallel.overlap import ChunkPipeline, chunk_order, overlapped_experts, reorder_permutation
from moe_train.routing.plan import RoutingPlan
from moe_train.routing.protocols import Experts


@dataclass
class DispatchState:
    """One layer call between the phases: the plan and permutation for the combine, the exchange plan, and what is
    in flight (plain: the pending receive buffer of the dispatch, then of the combine; chunked: the pipeline)."""

    plan: RoutingPlan
    perm: Permutation
    ex: CountExchange
    num_tokens: int
    pending: Optional[tuple] = None  # exchange.start_rows: (receive buffer, token)
    pipe: Optional[ChunkPipeline] = None


class AllToAllDispatcher:
    """A Dispatcher (routing/protocols.py), as LocalDispatcher: ``__call__(x_TD, plan, experts) -> y_TD``, or the
    phases dispatch / run_experts / combine (module docstring); ``experts`` holds only this rank's L = E/ep experts
    (global ids [ep_rank*L, (ep_rank+1)*L))."""

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

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> DispatchState:
        """Count exchange (the layer's one host sync), permutation, and the row exchange issued, not waited."""
        E, b = self.num_experts, self.permute_backend
        assert plan.expert_idx_TK.shape[0] == x_TD.shape[0]
        # the router's counts: the exchange does not wait for the permutation
        ex = CountExchange.run(plan.counts_E, self.group, self.ep_size, self.ep_rank)
        perm = build_permutation(plan.expert_idx_TK, E, backend=b, num_rows=ex.rows_sent)
        self.last = ex.stats(x_TD.shape[1] * x_TD.element_size())
        if self.overlap_chunks > 1 and self.ep_size > 1:  # rows permuted straight into chunk-major order
            order_N, _ = chunk_order(ex.send_counts_E, self.overlap_chunks, x_TD.device, plan.counts_E)
            perm = reorder_permutation(perm, order_N)
            pipe = ChunkPipeline(ex, self.overlap_chunks)
            pipe.start(permute(x_TD, perm, backend=b))
            return DispatchState(plan, perm, ex, x_TD.shape[0], pipe=pipe)
        return DispatchState(plan, perm, ex, x_TD.shape[0], pending=ex.start_dispatch(permute(x_TD, perm, backend=b)))

    def run_experts(self, st: DispatchState, experts: Experts) -> DispatchState:
        """Waits for the rows, runs this rank's experts, issues the combine exchange (not waited); returns the state
        the combine takes (a new one: a phase hands its results on by value, which torch.compile's graph breaks
        between the phases keep)."""
        assert experts.num_experts == self.num_local, (experts.num_experts, self.num_local)
        if st.pipe is not None:
            overlapped_experts(st.pipe, experts)
            return st
        ex = st.ex
        x_RD = ex.to_expert_major(ex.wait_dispatch(st.pending))
        y_RD = experts(x_RD, ex.recv_counts_dev_PL.sum(0))
        return dataclasses.replace(st, pending=ex.start_combine(ex.from_expert_major(y_RD)))

    def combine(self, st: DispatchState) -> torch.Tensor:
        """Waits for the expert outputs and sums each token's rows with its gate weights: y_TD."""
        y_ND = st.pipe.finish() if st.pipe is not None else st.ex.wait_combine(st.pending)
        return unpermute_combine(y_ND, st.perm, st.plan.weight_TK, st.num_tokens, backend=self.permute_backend)

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: Experts) -> torch.Tensor:
        return self.combine(self.run_experts(self.dispatch(x_TD, plan), experts))
