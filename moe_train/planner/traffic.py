"""Bytes one rank moves per optimizer step: expert all-to-all and FSDP2 all-gather / reduce-scatter, split into
intra-node (NVLink) and inter-node (one InfiniBand NIC per GPU) shares.

All-to-all (parallel/dispatcher.py, parallel/exchange.py): a rank's remote bytes for one exchange are its true rows
that go to OTHER ep ranks times D times the element size of the rows (the compute dtype): exactly
DispatchStats.bytes_sent_remote (``a2a_bytes_sent`` below is that count from the per-expert send counts and is
tested equal to it). Per layer and micro-batch: dispatch + combine in the forward, the same two reversed in the
backward, and the forward pair again when activation checkpointing recomputes the layer. With balanced routing a
row goes to each ep rank alike: remote share (P - 1) / P; the ranks of the ep group on this rank's node take the
intra-node share (ep groups are consecutive ranks: parallel/distributed.py).
FSDP2 (parallel/parallelize.py): per micro-batch the units kept gathered after forward (the root, the last decoder
block, norm + head) are all-gathered once, every other unit (each block, the embedding, each experts unit) twice
(forward, backward: plan.py gathers_per_micro_batch); gradients of trainable parameters are reduce-scattered once per
micro-batch (the trainer does not skip the gradient sync while accumulating), in the reduce dtype (fp32). A
collective over m ranks moves (m - 1)/m of the full size per rank; when it spans n nodes with g of its ranks on
each, the n - 1 other nodes' share, (n - 1)/n of the full size, enters each node through its g NICs: (n - 1)/(n g)
per rank (a hierarchical ring), the rest over NVLink.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Traffic:
    a2a_intra: float = 0.0
    a2a_inter: float = 0.0
    fsdp_intra: float = 0.0
    fsdp_inter: float = 0.0
    detail: dict = field(default_factory=dict)


def a2a_bytes_sent(send_counts_E: list[int], ep_rank: int, ep_size: int, row_bytes: int) -> int:
    """Remote bytes of one dispatch exchange on this rank: rows to experts held by other ep ranks x row bytes (the
    dispatcher's DispatchStats.bytes_sent_remote)."""
    E = len(send_counts_E)
    assert E % ep_size == 0, (E, ep_size)
    L = E // ep_size
    own = sum(send_counts_E[ep_rank * L:(ep_rank + 1) * L])
    return (sum(send_counts_E) - own) * row_bytes


def node_span(ranks: list[int], gpus_per_node: int, me: int) -> tuple[int, int]:
    """(nodes the group spans, its ranks on my node)."""
    nodes = {r // gpus_per_node for r in ranks}
    return len(nodes), sum(1 for r in ranks if r // gpus_per_node == me // gpus_per_node)


def split_collective(full_bytes: float, ranks: list[int], gpus_per_node: int, me: int) -> tuple[float, float]:
    """(intra, inter) bytes per rank for an all-gather / reduce-scatter of ``full_bytes`` over ``ranks``."""
    m = len(ranks)
    if m <= 1:
        return 0.0, 0.0
    n, g = node_span(ranks, gpus_per_node, me)
    total = full_bytes * (m - 1) / m
    inter = full_bytes * (n - 1) / (n * g) if n > 1 else 0.0
    return max(total - inter, 0.0), inter


def a2a_traffic(rows_per_layer: float, row_bytes: int, layers: int, passes: int, ep: int, gpus_per_node: int,
                me: int) -> tuple[float, float]:
    """(intra, inter) all-to-all bytes per rank, balanced routing: ``passes`` exchanges per layer."""
    if ep <= 1:
        return 0.0, 0.0
    group = [(me // ep) * ep + i for i in range(ep)]
    _, local = node_span(group, gpus_per_node, me)
    remote = rows_per_layer * (ep - 1) / ep * row_bytes * layers * passes
    intra = remote * (local - 1) / (ep - 1)
    return intra, remote - intra
