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
Shape legend: T tokens on this rank, K slots, D hidden, E global experts, P = ep ranks, L = E/P local experts,
N rows this rank sends (its true assignments), R rows it receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.routing.plan import RoutingPlan


class _AllToAll(torch.autograd.Function):
    """Uneven all_to_all_single along dim 0; backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        out = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


def expert_major_order(recv_counts_PL: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row order that turns (source rank, local expert)-grouped rows into (local expert, source rank) groups.

    order_R[j] = the arrival row that goes to position j; computed on device, num_rows (known on the host) sizes
    the output, so no extra sync.
    """
    P, L = recv_counts_PL.shape
    arrival_start_PL = (torch.cumsum(recv_counts_PL.reshape(-1), 0) - recv_counts_PL.reshape(-1)).view(P, L)
    counts_LP = recv_counts_PL.t().reshape(-1)
    target_start_LP = torch.cumsum(counts_LP, 0) - counts_LP
    shift_LP = arrival_start_PL.t().reshape(-1) - target_start_LP
    return torch.repeat_interleave(shift_LP, counts_LP, output_size=num_rows) + torch.arange(
        num_rows, device=recv_counts_PL.device)


def inverse_order(order_R: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order_R)
    inv[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return inv


@dataclass
class DispatchStats:
    """Rows of one call (one layer forward). 'rows' are true assignments; each crosses the wire as D values."""

    rows_sent: int = 0  # this rank's true assignments (rows entering the all-to-all, own rank included)
    rows_received: int = 0  # rows this rank's experts compute (own rank included)
    rows_sent_remote: int = 0  # rows that leave this rank
    rows_received_remote: int = 0
    bytes_sent_remote: int = 0  # payload of one dispatch all-to-all; combine and the two backward ones equal it
    send_counts_E: list = field(default_factory=list)  # rows to each global expert
    recv_counts_PL: list = field(default_factory=list)  # [source rank][local expert] rows received


class AllToAllDispatcher:
    """Same interface as LocalDispatcher: ``__call__(x_TD, plan, experts) -> y_TD``; ``experts`` holds only this
    rank's L = E/ep experts (global ids [ep_rank*L, (ep_rank+1)*L))."""

    def __init__(self, ep_group, num_experts: int, permute_backend: str = "auto"):
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the ep group size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.permute_backend = permute_backend
        self.last = DispatchStats()
        self.totals = {"calls": 0, "rows_sent": 0, "rows_received": 0, "rows_sent_remote": 0, "bytes_sent_remote": 0}

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
        P, L, E, b = self.ep_size, self.num_local, self.num_experts, self.permute_backend
        assert experts.num_experts == L, (experts.num_experts, L)
        assert plan.expert_idx_TK.shape[0] == x_TD.shape[0]
        send_counts_E = plan.counts_E  # the router's counts: the exchange does not wait for the permutation
        recv_counts_E = torch.empty_like(send_counts_E)  # [P*L]: from each source rank, per local expert
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        # The one host sync of the layer: the splits, the receive buffer size and the permutation's row count.
        host = torch.cat([send_counts_E, recv_counts_E]).tolist()
        send_E, recv_PL = host[:E], [host[E + p * L: E + (p + 1) * L] for p in range(P)]
        perm = build_permutation(plan.expert_idx_TK, E, backend=b, num_rows=sum(send_E))
        send_P = [sum(send_E[p * L:(p + 1) * L]) for p in range(P)]
        recv_P = [sum(row) for row in recv_PL]
        R = sum(recv_P)

        x_ND = permute(x_TD, perm, backend=b)
        x_RD = all_to_all_rows(x_ND, recv_P, send_P, self.group)
        recv_counts_PL = recv_counts_E.view(P, L)
        order_R = None
        if L > 1 and P > 1:  # rows arrive by source rank then expert: group them by local expert
            order_R = expert_major_order(recv_counts_PL, R)
            x_RD = x_RD.index_select(0, order_R)
        y_RD = experts(x_RD, recv_counts_PL.sum(0))
        if order_R is not None:
            y_RD = y_RD.index_select(0, inverse_order(order_R))
        y_ND = all_to_all_rows(y_RD, send_P, recv_P, self.group)

        me = self.ep_rank
        self.last = DispatchStats(
            rows_sent=sum(send_P), rows_received=R, rows_sent_remote=sum(send_P) - send_P[me],
            rows_received_remote=R - recv_P[me],
            bytes_sent_remote=(sum(send_P) - send_P[me]) * x_TD.shape[1] * x_TD.element_size(),
            send_counts_E=send_E, recv_counts_PL=recv_PL)
        t = self.totals
        t["calls"] += 1
        t["rows_sent"] += self.last.rows_sent
        t["rows_received"] += R
        t["rows_sent_remote"] += self.last.rows_sent_remote
        t["bytes_sent_remote"] += self.last.bytes_sent_remote
        return unpermute_combine(y_ND, perm, plan.weight_TK, x_TD.shape[0], backend=b)
