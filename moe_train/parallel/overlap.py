"""Expert-parallel all-to-all overlapped with the expert GEMMs (config ``parallel.a2a_overlap_chunks`` = C >= 2).

Every (source rank, expert) block of rows is cut into C consecutive parts, part c of a block of n rows being rows
[n*c // C, n*(c+1) // C) (both sides compute it from the exchanged counts, so no extra communication). Chunk c is
part c of every block. The sender permutes its tokens straight into chunk-major order (chunk, expert, position: a
reordered Permutation, so there is no extra pass over the rows and the combine reads them in that order), and:

    start dispatch(0)
    for c in 0..C-1:  start dispatch(c+1);  wait dispatch(c);  experts(chunk c);  start combine(c)
    wait combine(0..C-1)

so the dispatch all-to-all of chunk c+1 and the combine of chunk c-1 are in flight while chunk c's experts compute
(functional all_to_all_single, parallel/collectives.py: gloo runs it on its own threads, NCCL on its stream). In the
dispatcher's phases (parallel/dispatcher.py) ChunkPipeline.start issues chunk 0 (dispatch phase: the shared expert
runs while it travels), ``overlapped_experts`` runs the loop and leaves the combines in flight (experts phase: the
null term runs meanwhile), ChunkPipeline.finish waits for them (combine phase). In backward the same pattern falls
out of autograd's order (later nodes first): each wait's backward STARTS the reverse exchange and the matching
start's backward waits for it, with the expert backward of another chunk between (exchange.py: start_rows /
wait_rows).
Rows are the plain path's rows, computed by the same experts in smaller groups, so outputs and gradients equal the
plain AllToAllDispatcher's up to fp32 summation order inside the GEMMs (tests/test_overlap.py: 1e-6).
Collectives are issued in the same order on every rank (the graph is the same on every rank; empty chunks still
exchange), as gloo and NCCL require.

Exposed communication: ``CommTimer`` (parallel/collectives.py, re-exported here) adds the host time spent issuing
and waiting on every exchange, forward and backward, plain or chunked.
Shape legend (docs/shapes.md, with its exceptions for N and L): N rows this rank sends, R rows it receives,
P ep ranks, L local experts, E global experts, D hidden, Ck chunks (C in the text).
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_train.kernels.permute import Permutation
from moe_train.parallel.collectives import CommTimer
from moe_train.parallel.exchange import CountExchange, expert_major_order, inverse_order, start_rows, wait_rows

__all__ = ["CommTimer", "ChunkPipeline", "chunk_bounds", "chunk_order", "overlapped_experts", "reorder_permutation"]


def _part(n: int, c: int, C: int) -> tuple[int, int]:
    """Rows [lo, hi) of a block of n rows that belong to chunk c of C (both ranks compute the same cut)."""
    return n * c // C, n * (c + 1) // C


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


class ChunkPipeline:
    """One layer call's chunked exchange (module docstring): the host splits of every chunk (from the layer's one
    host sync), the chunk receive counts on device, and the exchanges in flight between the dispatcher's phases."""

    def __init__(self, ex: CountExchange, C: int):
        P, L = ex.ep_size, ex.num_local
        send_E = ex.send_counts_E
        self.ex, self.C = ex, C
        # rows to / from each rank in each chunk: host ints, as the functional all_to_all_single takes its splits
        self.send_CkP = [[sum(_part(n, c, C)[1] - _part(n, c, C)[0] for n in send_E[p * L:(p + 1) * L])
                          for p in range(P)] for c in range(C)]
        self.recv_CkP = [[sum(_part(n, c, C)[1] - _part(n, c, C)[0] for n in row) for row in ex.recv_counts_PL]
                         for c in range(C)]
        # every chunk's receive counts, on device from the exchanged ones (no tensor from a host list)
        bounds_CkPL = chunk_bounds(ex.recv_counts_dev_PL, C)
        self.counts_CkPL = bounds_CkPL[1:] - bounds_CkPL[:-1]
        self.x_chunks: list[torch.Tensor] = []
        self.dispatching: dict[int, tuple] = {}  # chunk -> pending dispatch (exchange.start_rows)
        self.combining: list[tuple] = []  # pending combines, chunk order

    def start_dispatch(self, c: int) -> None:
        self.dispatching[c] = start_rows(self.x_chunks[c], self.recv_CkP[c], self.send_CkP[c], self.ex.group)

    def start(self, x_ND: torch.Tensor) -> None:
        """x_ND in chunk-major order (chunk_order): issues chunk 0's dispatch."""
        self.x_chunks = list(torch.split(x_ND, [sum(s) for s in self.send_CkP]))
        self.start_dispatch(0)

    def finish(self) -> torch.Tensor:
        """Waits for every chunk's combine: y_ND in chunk-major order."""
        assert len(self.combining) == self.C, "overlapped_experts has not run"
        g = self.ex.group
        y_ND = torch.cat([wait_rows(buf, self.send_CkP[c], self.recv_CkP[c], g) for c, buf in enumerate(self.combining)])
        self.combining = []
        return y_ND


def overlapped_experts(pipe: ChunkPipeline, experts) -> None:
    """The experts phase of the chunked exchange: for each chunk, issue the next chunk's dispatch, wait for this
    one, compute it, issue its combine (left in flight for ChunkPipeline.finish)."""
    ex, C = pipe.ex, pipe.C
    P, L = ex.ep_size, ex.num_local
    for c in range(C):
        if c + 1 < C:  # issued before this chunk's experts: it travels while they compute
            pipe.start_dispatch(c + 1)
        x_RD = wait_rows(pipe.dispatching.pop(c), pipe.recv_CkP[c], pipe.send_CkP[c], ex.group)
        counts_PL = pipe.counts_CkPL[c]
        R = x_RD.shape[0]
        order = expert_major_order(counts_PL, R) if L > 1 and P > 1 else None
        y_RD = experts(x_RD if order is None else x_RD.index_select(0, order), counts_PL.sum(0))
        if order is not None:
            y_RD = y_RD.index_select(0, inverse_order(order))
        pipe.combining.append(start_rows(y_RD, pipe.send_CkP[c], pipe.recv_CkP[c], ex.group))
