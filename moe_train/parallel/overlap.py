"""Expert-parallel all-to-all overlapped with the expert GEMMs (config ``parallel.a2a_overlap_chunks`` = C >= 2).

Every (source rank, expert) block of rows is cut into C consecutive parts, part c of a block of n rows being rows
[n*c // C, n*(c+1) // C) (both sides compute it from the exchanged counts, so no extra communication). Chunk c is
part c of every block. The sender permutes its tokens straight into chunk-major order (chunk, expert, position: a
reordered Permutation, so there is no extra pass over the rows and the combine reads them in that order), and:

    start dispatch(0)
    for c in 0..C-1:  start dispatch(c+1);  wait dispatch(c);  experts(chunk c);  start combine(c)
    wait combine(0..C-1)

so the dispatch all-to-all of chunk c+1 and the combine of chunk c-1 are in flight while chunk c's experts compute
(async ``all_to_all_single`` work handles; gloo runs them on its own threads, NCCL on its stream). In backward the
same pattern falls out of autograd's order (later nodes first): each ``_Wait`` node's backward STARTS the reverse
exchange and the matching ``_Start`` node's backward waits for it, with the expert backward of another chunk between.
Rows are the plain path's rows, computed by the same experts in smaller groups, so outputs and gradients equal the
plain AllToAllDispatcher's up to fp32 summation order inside the GEMMs (tests/test_overlap.py: 1e-6).
Collectives are issued in the same order on every rank (the graph is the same on every rank; empty chunks still
exchange), as gloo and NCCL require.

Exposed communication: ``CommTimer`` (when active) adds the host time spent issuing and waiting on every exchange,
forward and backward; on gloo that is the communication the computation did not hide (on NCCL wait() only orders
streams: use a profiler there).
Shape legend (docs/shapes.md, with its exceptions for N and L): N rows this rank sends, R rows it receives,
P ep ranks, L local experts, E global experts, D hidden, Ck chunks (C in the text).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch

from moe_train.kernels.permute import Permutation
from moe_train.parallel.collectives import all_to_all_single
from moe_train.parallel.exchange import CountExchange, expert_major_order, inverse_order


class CommTimer:
    """Host seconds spent in exchange calls while active (forward and backward)."""

    active: Optional["CommTimer"] = None

    def __init__(self):
        self.seconds = 0.0

    @classmethod
    @contextmanager
    def measure(cls):
        timer = cls.active = cls()
        try:
            yield timer
        finally:
            cls.active = None

    @classmethod
    @contextmanager
    def span(cls):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cls.active is not None:
                cls.active.seconds += time.perf_counter() - t0


def _part(n: int, c: int, C: int) -> tuple[int, int]:
    """Rows [lo, hi) of a block of n rows that belong to chunk c of C (both ranks compute the same cut)."""
    return n * c // C, n * (c + 1) // C


class _Box:
    """The pending exchange between a _Start node and its _Wait node (forward), or their backward pair."""

    def __init__(self, group, out_splits: list[int], in_splits: list[int]):
        self.group, self.out_splits, self.in_splits = group, out_splits, in_splits
        self.work = None
        self.keep = None  # tensors the collective reads or writes until it completes
        self.grad = None  # backward: the reverse exchange's receive buffer, handed from _Wait to _Start

    def start(self, x: torch.Tensor, out_splits, in_splits) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        with CommTimer.span():
            self.work = all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        self.keep = (x, out)
        return out

    def wait(self) -> None:
        with CommTimer.span():
            self.work.wait()
        self.work = self.keep = None


class _Start(torch.autograd.Function):
    """Issues the exchange; returns the receive buffer (filled once the paired _Wait has run). Backward: waits for
    the reverse exchange _Wait's backward issued and returns its result as x's gradient."""

    @staticmethod
    def forward(ctx, x, box: _Box):
        ctx.box = box
        return box.start(x, box.out_splits, box.in_splits)

    @staticmethod
    def backward(ctx, _grad_buf):
        box = ctx.box  # _grad_buf: only the token that orders this node after _Wait's backward
        grad_x = box.grad
        box.wait()  # the reverse exchange that _Wait.backward started
        box.grad = None
        return grad_x, None


class _Wait(torch.autograd.Function):
    """Waits for the exchange; backward starts the reverse exchange (splits swapped) without waiting."""

    @staticmethod
    def forward(ctx, buf, box: _Box):
        box.wait()
        ctx.box = box
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, g):
        box = ctx.box
        box.grad = box.start(g, box.in_splits, box.out_splits)  # filled by the time _Start's backward waits
        return g, None  # passes the order to _Start's backward; its value is not used


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    box = _Box(group, out_splits, in_splits)
    return _Start.apply(x, box), box


def chunk_bounds(counts: torch.Tensor, C: int) -> torch.Tensor:
    """[C + 1, *counts.shape]: the cut of _part for every block of ``counts`` rows at once, on counts' device (so a
    layer computes its chunk counts in one pass over device tensors, never from host lists: building a device
    tensor from a Python list is a host-to-device copy that waits for the GPU, once per chunk)."""
    c = torch.arange(C + 1, device=counts.device, dtype=counts.dtype).view((C + 1,) + (1,) * counts.dim())
    return counts.unsqueeze(0) * c // C


def chunk_order(send_counts_E: list[int], C: int, device, counts_dev_E: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, list[list[int]]]:
    """(order_N, parts_CkE): order_N[j] = the expert-grouped row that goes to chunk-major position j; parts_CkE[c][e] =
    rows of expert e in chunk c. ``counts_dev_E``: the same counts already on ``device`` (the router's counts_E), so
    that the order is computed there without a host-to-device copy; without it they are copied once."""
    parts = [[_part(n, c, C)[1] - _part(n, c, C)[0] for n in send_counts_E] for c in range(C)]
    N = sum(send_counts_E)
    if counts_dev_E is None:
        counts_dev_E = torch.tensor(send_counts_E, dtype=torch.int64, device=device)
    counts_E = counts_dev_E.to(device=device, dtype=torch.int64)
    bounds_CkE = chunk_bounds(counts_E, C)
    length = (bounds_CkE[1:] - bounds_CkE[:-1]).reshape(-1)  # chunk-major, then expert
    src = ((torch.cumsum(counts_E, 0) - counts_E)[None, :] + bounds_CkE[:-1]).reshape(-1)
    shift = src - (torch.cumsum(length, 0) - length)
    return torch.repeat_interleave(shift, length, output_size=N) + torch.arange(N, device=device), parts


def reorder_permutation(perm: Permutation, order_N: torch.Tensor) -> Permutation:
    """The same permutation with its rows in the order order_N (row j of the result = row order_N[j])."""
    inv_N = inverse_order(order_N)
    row_TK = perm.row_TK
    row2 = torch.where(row_TK >= 0, inv_N[row_TK.clamp(min=0)], row_TK)
    has_gather = perm.rows_Ns is not None  # else built lazily from row2 (Permutation.gather_index)
    return Permutation(slot_N=perm.slot_N[order_N], token_N=perm.token_N[order_N], counts_E=perm.counts_E,
                       row_TK=row2, slots_Ns=perm.slots_Ns, rows_Ns=inv_N[perm.rows_Ns] if has_gather else None,
                       offsets_T=perm.offsets_T)


def overlapped_experts(x_ND: torch.Tensor, ex: CountExchange, experts, C: int) -> torch.Tensor:
    """x_ND in chunk-major order (chunk_order) -> y_ND in the same order, exchanged and computed in C chunks."""
    P, L = ex.ep_size, ex.num_local
    send_E = ex.send_counts_E
    parts_send = [[sum(_part(n, c, C)[1] - _part(n, c, C)[0] for n in send_E[p * L:(p + 1) * L]) for p in range(P)]
                  for c in range(C)]
    parts_recv_PL = [[[_part(n, c, C)[1] - _part(n, c, C)[0] for n in row] for row in ex.recv_counts_PL]
                     for c in range(C)]
    x_chunks = torch.split(x_ND, [sum(s) for s in parts_send])
    # every chunk's receive counts, on device from the exchanged ones (the splits above are host ints: they come
    # from the layer's one host sync and all_to_all_single takes them as Python lists)
    bounds_CkPL = chunk_bounds(ex.recv_counts_dev_PL, C)
    counts_CkPL = bounds_CkPL[1:] - bounds_CkPL[:-1]
    pending = {0: _exchange(x_chunks[0], [sum(r) for r in parts_recv_PL[0]], parts_send[0], ex.group)}
    outs = []
    for c in range(C):
        if c + 1 < C:  # issued before this chunk's experts: it travels while they compute
            pending[c + 1] = _exchange(x_chunks[c + 1], [sum(r) for r in parts_recv_PL[c + 1]], parts_send[c + 1],
                                       ex.group)
        buf, box = pending.pop(c)
        x_RD = _Wait.apply(buf, box)
        counts_PL = counts_CkPL[c]
        R = x_RD.shape[0]
        order = expert_major_order(counts_PL, R) if L > 1 and P > 1 else None
        y_RD = experts(x_RD if order is None else x_RD.index_select(0, order), counts_PL.sum(0))
        if order is not None:
            y_RD = y_RD.index_select(0, inverse_order(order))
        outs.append(_exchange(y_RD, parts_send[c], [sum(r) for r in parts_recv_PL[c]], ex.group))
    return torch.cat([_Wait.apply(buf, box) for buf, box in outs])
