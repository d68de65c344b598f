"""The expert-parallel count exchange: one plan of who sends how many rows to whom, shared by both dispatchers.

Experts are contiguous per ep rank (rank p holds global experts [p*L, (p+1)*L)), so rows sorted by global expert are
already grouped by destination rank, then local expert. Per layer call:

    send_counts_E --all_to_all_single--> recv_counts_PL       (on device)
    one .tolist() of both (+ caller's extra values)            the layer's ONE host sync: splits, buffer sizes
    send_P[p] = sum_l send_counts_E[p*L + l],  recv_P[p] = sum_l recv_counts_PL[p][l]   (the uneven splits)
    x_ND --dispatch_rows--> x_RD (by source rank, then local expert) --to_expert_major--> by (local expert, source)
    y_RD --from_expert_major--> --combine_rows--> y_ND

CountExchange holds all of it (host counts and splits, the on-device receive counts, the regrouping order) and the
row statistics of the call; AllToAllDispatcher (parallel/dispatcher.py, native) and VariableKAllToAllDispatcher
(parallel/megatron/dispatcher.py) both build one per call. Every exchange is split in two, start and wait
(functional collectives, traceable by torch.compile: parallel/collectives.py), so the caller computes between them
(the shared expert, the null term, other chunks); as autograd functions their backward is the reverse exchange with
swapped splits, itself started by the wait's backward and waited by the start's. On one ep rank nothing is
communicated.
Shape legend (docs/shapes.md, with its exceptions for N and L):
E global experts, P = ep ranks, L = E/P local experts, N rows this rank sends (its true
assignments), R rows it receives, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_train.parallel.collectives import all_to_all_start, wait_tensor


class _StartRows(torch.autograd.Function):
    """Issues the uneven all-to-all of rows (functional, parallel/collectives.py::all_to_all_start). Returns the
    receive buffer, valid once the paired _WaitRows has run, and a token shaped like x (a zero-stride view, no
    memory) that carries the backward exchange: _WaitRows' backward issues the reverse exchange and returns its
    pending result as the token's gradient, which has x's shape (the buffer's gradient would need R rows, not N);
    this backward waits for it and returns it as x's gradient."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.set_materialize_grads(False)  # the buffer gets no gradient: no [R, D] zeros
        token = x_ND.new_zeros(()).expand(x_ND.shape)
        return all_to_all_start(x_ND, out_splits, in_splits, group), token

    @staticmethod
    def backward(ctx, _grad_buf, grad_pending: Optional[torch.Tensor]):
        return None if grad_pending is None else wait_tensor(grad_pending), None, None, None


class _WaitRows(torch.autograd.Function):
    """Waits for the exchange _StartRows issued. Backward issues the reverse exchange (splits swapped) WITHOUT
    waiting: autograd runs the backward of whatever the forward computed between start and wait (ready nodes created
    later run first) before _StartRows' backward waits, so that computation hides the reverse exchange too."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, token: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return wait_tensor(buf).view_as(buf)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return None, all_to_all_start(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def start_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Issues the uneven all-to-all of x_ND's rows (in_splits rows to each rank, out_splits from each); returns
    what is pending, (receive buffer, token), for wait_rows (with the same splits)."""
    return _StartRows.apply(x_ND, out_splits, in_splits, group)


def wait_rows(pending, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """The received rows of start_rows(..., out_splits, in_splits, group); differentiable (reverse exchange)."""
    buf, token = pending
    return _WaitRows.apply(buf, token, out_splits, in_splits, group)


def all_to_all_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """start_rows + wait_rows with nothing between."""
    return wait_rows(start_rows(x_ND, out_splits, in_splits, group), out_splits, in_splits, group)


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


@dataclass
class CountExchange:
    """One layer call's exchange plan (module docstring). Build it with ``CountExchange.run``.

    send_counts_E:  rows this rank sends to each global expert (host)
    recv_counts_PL: rows received from each source rank for each local expert (host)
    send_P/recv_P:  the uneven all-to-all splits (rows to / from each ep rank)
    recv_counts_dev_PL: recv_counts_PL on device (the reorder index and the expert GEMM counts need no sync)
    extra:          the caller's extra values read in the same host sync (e.g. a count to check)
    """

    group: object
    ep_rank: int
    send_counts_E: list[int]
    recv_counts_PL: list[list[int]]
    send_P: list[int]
    recv_P: list[int]
    recv_counts_dev_PL: torch.Tensor
    extra: list[int] = field(default_factory=list)
    _order_R: Optional[torch.Tensor] = field(default=None, init=False, repr=False)  # built on first use
    _inverse_R: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    @classmethod
    def run(cls, send_counts_E: torch.Tensor, group, ep_size: int, ep_rank: int,
            extra: Optional[torch.Tensor] = None) -> "CountExchange":
        """Exchanges the per-expert counts over ``group`` (ep_size ranks) and reads them on the host once.
        ``send_counts_E`` [E] int64 on device (E = ep_size * L); ``extra``: int64 values [X] to read in that sync."""
        E, P = send_counts_E.numel(), ep_size
        assert E % P == 0, (E, P)
        L = E // P
        if P > 1:  # [P*L]: from each source rank, per local expert
            recv_counts_E = wait_tensor(all_to_all_start(send_counts_E, [L] * P, [L] * P, group))
        else:
            recv_counts_E = send_counts_E
        # The one host sync of the layer: the splits, the receive buffer size, the permutation's row count.
        host = torch.cat([send_counts_E, recv_counts_E] + ([extra.reshape(-1)] if extra is not None else [])).tolist()
        send_E, recv_PL = host[:E], [host[E + p * L: E + (p + 1) * L] for p in range(P)]
        return cls(group=group, ep_rank=ep_rank, send_counts_E=send_E, recv_counts_PL=recv_PL,
                   send_P=[sum(send_E[p * L:(p + 1) * L]) for p in range(P)], recv_P=[sum(row) for row in recv_PL],
                   recv_counts_dev_PL=recv_counts_E.view(P, L), extra=host[2 * E:])

    @property
    def ep_size(self) -> int:
        return len(self.send_P)

    @property
    def num_local(self) -> int:
        return self.recv_counts_dev_PL.shape[1]

    @property
    def rows_sent(self) -> int:
        return sum(self.send_P)

    @property
    def rows_received(self) -> int:
        return sum(self.recv_P)

    def recv_counts_L(self) -> list[int]:
        """Rows each local expert computes, summed over source ranks (host)."""
        return [sum(col) for col in zip(*self.recv_counts_PL)]

    # ---- rows ----------------------------------------------------------------------------------------------

    def start_dispatch(self, x_ND: torch.Tensor):
        """Issues the dispatch exchange of [N, ...] rows by (destination rank, expert); returns what is pending
        for wait_dispatch (start_rows; on one ep rank: x_ND itself, nothing is sent)."""
        return x_ND if self.ep_size == 1 else start_rows(x_ND, self.recv_P, self.send_P, self.group)

    def wait_dispatch(self, buf) -> torch.Tensor:
        """-> [R, ...] rows by (source rank, local expert)."""
        return buf if self.ep_size == 1 else wait_rows(buf, self.recv_P, self.send_P, self.group)

    def start_combine(self, y_RD: torch.Tensor):
        """Issues the reverse exchange: [R, ...] in arrival order back to their source ranks (pending)."""
        return y_RD if self.ep_size == 1 else start_rows(y_RD, self.send_P, self.recv_P, self.group)

    def wait_combine(self, buf) -> torch.Tensor:
        """-> [N, ...] in this rank's send order."""
        return buf if self.ep_size == 1 else wait_rows(buf, self.send_P, self.recv_P, self.group)

    def dispatch_rows(self, x_ND: torch.Tensor) -> torch.Tensor:
        """start_dispatch + wait_dispatch with nothing between."""
        return self.wait_dispatch(self.start_dispatch(x_ND))

    def combine_rows(self, y_RD: torch.Tensor) -> torch.Tensor:
        """start_combine + wait_combine with nothing between."""
        return self.wait_combine(self.start_combine(y_RD))

    @property
    def order_R(self) -> Optional[torch.Tensor]:
        """expert_major_order of the received rows; None when arrival order is already grouped by expert (one
        local expert, or one source rank)."""
        if self._order_R is None and self.num_local > 1 and self.ep_size > 1:
            self._order_R = expert_major_order(self.recv_counts_dev_PL, self.rows_received)
        return self._order_R

    def to_expert_major(self, x_RD: torch.Tensor) -> torch.Tensor:
        """Arrival order (source rank, local expert) -> (local expert, source rank), for the grouped GEMM."""
        order_R = self.order_R
        return x_RD if order_R is None else x_RD.index_select(0, order_R)

    def from_expert_major(self, y_RD: torch.Tensor) -> torch.Tensor:
        """The inverse of to_expert_major: back to arrival order, for the combine all-to-all."""
        order_R = self.order_R
        if order_R is None:
            return y_RD
        if self._inverse_R is None:
            self._inverse_R = inverse_order(order_R)
        return y_RD.index_select(0, self._inverse_R)

    # ---- statistics ----------------------------------------------------------------------------------------

    def stats(self, row_bytes: int) -> DispatchStats:
        """The call's DispatchStats; ``row_bytes`` = D * element size of one row."""
        me, N, R = self.ep_rank, self.rows_sent, self.rows_received
        return DispatchStats(rows_sent=N, rows_received=R, rows_sent_remote=N - self.send_P[me],
                             rows_received_remote=R - self.recv_P[me],
                             bytes_sent_remote=(N - self.send_P[me]) * row_bytes,
                             send_counts_E=self.send_counts_E, recv_counts_PL=self.recv_counts_PL)
