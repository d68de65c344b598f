"""Our variable-k all-to-all as Megatron-Core's token dispatcher, and the MoELayer subclass that installs it.

Megatron's MoELayer calls six dispatcher methods around its experts (MoETokenDispatcher contract):

    dispatch_preprocess(x [S,B,D], routing_map [T,E], probs [T,E]) -> rows x_ND, their gate weights w_N
    token_dispatch(x_ND, w_N)            -> pending x, w     uneven all_to_all_single over the ep group, ISSUED
    dispatch_postprocess(pending x, w)   -> waits; rows grouped by local expert, tokens_per_expert (CPU), weights
    experts(rows, tokens_per_expert, weights)   Megatron's SequentialMLP / TEGroupedMLP: they apply the weights
    combine_preprocess(y)                -> rows back in arrival order
    token_combine(y_RD)                  -> pending y        the reverse all_to_all, ISSUED
    combine_postprocess(pending y)       -> waits; y [S,B,D] sum of each token's rows (weights already applied)

The exchanges are functional collectives split into start and wait (parallel/exchange.py: start_rows /
wait_rows, traceable by torch.compile), so the layer computes between them: VariableKMoELayer runs Megatron's
shared experts after token_dispatch has issued the rows and before dispatch_postprocess waits for them, and
ZeroComputeMoELayer's null term between token_combine and combine_postprocess (Megatron's own
moe_shared_expert_overlap needs a CUDA side stream; this overlap needs none). "pending" is exchange.start_rows'
(receive buffer, token) pair: it is valid only after the wait, and Megatron's layer passes it along untouched.

Unlike Megatron's alltoall dispatcher (which sizes its buffers as T * topk when dropless) everything here is sized
by the REAL number of true assignments N: the routing map becomes a slot view idx [T, K] (-1 = no expert, K =
the router's most true experts per token), moe_train's build_permutation keeps only the true slots, and a null
pick is never permuted, sent or computed. A token with no true expert has no row and gets 0. A rank that sends
or receives nothing takes part in the collectives with zero-length splits.

One host sync per layer call (as Megatron's alltoall: the splits must be on the host): the per-expert counts come
from routing_map.sum(0), are exchanged first, and one .tolist() reads both count vectors (sent and received per
expert) plus the number of true slots, which sizes the permutation (build_permutation(num_rows=...), no sync of
its own) and checks that no token had more than K experts. No extra stream is used: the count exchange is tiny
and the blocking read is the only wait before the token all-to-all. The exchange, splits, regrouping and row
statistics are parallel/exchange.py::CountExchange, the same object the native AllToAllDispatcher uses. On CUDA
the collectives run on NCCL through Megatron's ep process group; that path is unverified here (no GPU in
development).
Shape legend (docs/shapes.md, with its exceptions for N and L):
S sequence, B micro-batch, T = S*B tokens, D hidden, E global experts, K slots per token,
P = ep ranks, L = E/P local experts, N rows this rank sends, R rows it receives.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from moe_train.kernels.permute import build_permutation, permute, unpermute_combine
from moe_train.parallel.exchange import CountExchange, DispatchStats
from moe_train.parallel.megatron import compat
from moe_train.parallel.megatron.zero_compute import ZeroComputeMoELayer


def routing_map_to_slots(routing_map_TE: torch.Tensor, max_slots: int) -> torch.Tensor:
    """idx [T, K]: each token's true experts in ascending order, then -1; K = min(max_slots, E)."""
    T, E = routing_map_TE.shape
    K = min(max_slots, E)
    # Picked experts score E - e > 0 (lower id first), the rest 0: topk puts a token's picks first, in order.
    key_TE = routing_map_TE.to(torch.float32) * torch.arange(E, 0, -1, device=routing_map_TE.device,
                                                             dtype=torch.float32)
    vals_TK, idx_TK = torch.topk(key_TE, K, dim=1)
    return torch.where(vals_TK > 0, idx_TK, torch.full_like(idx_TK, -1))


class VariableKAllToAllDispatcher(MoETokenDispatcher):
    """Megatron MoETokenDispatcher over ``pg_collection.ep`` that sends only true assignments."""

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config, pg_collection,
                 max_slots: Optional[int] = None, permute_backend: str = "auto"):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size > 1:
            raise ValueError(f"expert tensor parallelism (expert_tensor_parallel_size={self.tp_size}) is not supported "
                             "by the variable-k all-to-all dispatcher: use expert_tensor_parallel_size=1")
        if getattr(config, "moe_router_padding_for_quantization", False):
            raise ValueError("moe_router_padding_for_quantization pads every expert to a fixed row multiple in the "
                             "router; with the variable-k dispatcher leave it off (TEGroupedMLP pads FP8 groups "
                             "itself)")
        if config.moe_shared_expert_overlap:
            raise ValueError("moe_shared_expert_overlap (Megatron's CUDA-stream overlap) is not supported by the "
                             "variable-k all-to-all dispatcher: leave it off; VariableKMoELayer runs the shared "
                             "experts while its exchange is in flight")
        self.num_experts = E = config.num_moe_experts
        self.num_local_experts = L = num_local_experts
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0
        assert E == L * self.ep_size, (E, L, self.ep_size)
        assert list(local_expert_indices) == list(range(self.ep_rank * L, (self.ep_rank + 1) * L)), \
            "experts are contiguous per ep rank"
        self.max_slots = config.moe_router_topk if max_slots is None else max_slots
        self.permute_backend = permute_backend
        self.last = DispatchStats()
        self._state = None

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        E, b = self.num_experts, self.permute_backend
        assert routing_map.dtype == torch.bool and routing_map.shape == probs.shape, (routing_map.dtype,
                                                                                       routing_map.shape, probs.shape)
        hidden_shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, hidden_shape[-1])
        T = x_TD.shape[0]
        idx_TK = routing_map_to_slots(routing_map, self.max_slots)
        true_TK = idx_TK >= 0
        w_TK = probs.gather(1, idx_TK.clamp(min=0)) * true_TK
        # Counts from the map: the exchange does not wait for the permutation. The one host sync also reads the
        # number of true slots, to check that the slot view kept every assignment of the map.
        ex = CountExchange.run(routing_map.sum(0), self.ep_group, self.ep_size, self.ep_rank,
                               extra=true_TK.sum().reshape(1))
        num_slots = ex.extra[0]
        if num_slots != ex.rows_sent:
            raise ValueError(f"routing_map holds {ex.rows_sent} assignments but only {num_slots} fit in "
                             f"max_slots={self.max_slots} per token: some token has more true experts than the "
                             "router declared (VariableKMoELayer reads max_slots from router.max_slots)")
        perm = build_permutation(idx_TK, E, backend=b, num_rows=num_slots)
        tokens_per_expert = torch.tensor(ex.recv_counts_L(), dtype=torch.long)  # CPU, as Megatron
        self._state = dict(hidden_shape=hidden_shape, T=T, perm=perm, true_TK=true_TK, exchange=ex,
                           tokens_per_expert=tokens_per_expert)
        self.last = ex.stats(x_TD.shape[1] * x_TD.element_size())
        x_ND = permute(x_TD, perm, backend=b)
        w_N = w_TK.reshape(-1).index_select(0, perm.slot_N)
        return x_ND, w_N

    def token_dispatch(self, x_ND: torch.Tensor, w_N: torch.Tensor):
        """Issues the exchange of the rows and of their weights; returns them pending (not waited)."""
        ex = self._state["exchange"]
        return ex.start_dispatch(x_ND), ex.start_dispatch(w_N)

    def dispatch_postprocess(self, x_pending, w_pending):
        """Waits for token_dispatch's exchanges; rows and weights grouped by local expert."""
        ex = self._state["exchange"]
        x_RD, w_R = ex.wait_dispatch(x_pending), ex.wait_dispatch(w_pending)
        return ex.to_expert_major(x_RD), self._state["tokens_per_expert"], ex.to_expert_major(w_R)

    def combine_preprocess(self, y_RD: torch.Tensor) -> torch.Tensor:
        return self._state["exchange"].from_expert_major(y_RD)

    def token_combine(self, y_RD: torch.Tensor):
        """Issues the reverse exchange; returns it pending (combine_postprocess waits)."""
        return self._state["exchange"].start_combine(y_RD)

    def combine_postprocess(self, y_pending) -> torch.Tensor:
        y_ND = self._state["exchange"].wait_combine(y_pending)
        s, self._state = self._state, None
        # Megatron's experts already multiplied each row by its gate weight: each token sums its rows. The torch
        # reference of unpermute_combine would multiply every row by 1 first (a wasted pass forward and backward),
        # so the CPU path adds the rows directly; the Triton kernel fuses the weight into its single pass.
        b = self.permute_backend
        if b == "torch" or (b == "auto" and not y_ND.is_cuda):
            y_TD = y_ND.new_zeros(s["T"], y_ND.shape[1]).index_add_(0, s["perm"].token_N, y_ND)
        else:
            y_TD = unpermute_combine(y_ND, s["perm"], s["true_TK"].to(y_ND.dtype), s["T"], backend=b)
        return y_TD.view(s["hidden_shape"])


@contextlib.contextmanager
def _megatron_dispatcher_not_built(config):
    """MoELayer.__init__ always builds the dispatcher its config names; ours replaces it right after. Building
    the cheap allgather one meanwhile avoids the alltoall one's CUDA stream (absent on CPU) and flex's DeepEP.
    The config object is shared by the whole model, so it is restored before anything else can read it."""
    saved = config.moe_token_dispatcher_type
    config.moe_token_dispatcher_type = "allgather"
    try:
        yield
    finally:
        config.moe_token_dispatcher_type = saved


class VariableKMoELayer(ZeroComputeMoELayer):
    """Megatron MoELayer whose token dispatcher is VariableKAllToAllDispatcher (whatever
    ``moe_token_dispatcher_type`` says); router, experts, shared experts and recompute are Megatron's. Identity /
    constant null picks are added on the token's rank by ZeroComputeMoELayer (parallel/megatron/zero_compute.py).

    ``permute_backend`` (moe_train.kernels.permute) defaults to the router's ``routing.permute_backend``.
    Megatron 0.16.1's TransformerLayer passes ``pg_collection`` only to the exact MoELayer class, so inside a GPT
    model this layer takes Megatron's default process groups (parallel_state), as MoELayer does when given none.
    """

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 permute_backend: Optional[str] = None, **kwargs):
        if pg_collection is None:
            pg_collection = compat.default_pg_collection()
        if config.moe_shared_expert_overlap:
            raise ValueError("moe_shared_expert_overlap (Megatron's CUDA-stream overlap) is not supported with the "
                             "variable-k all-to-all dispatcher: leave it off; this layer runs the shared experts "
                             "while its exchange is in flight")
        base_kwargs = compat.moe_layer_kwargs(MoELayer.__init__, **kwargs)
        with _megatron_dispatcher_not_built(config):
            super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                             pg_collection=pg_collection, **base_kwargs)
        if permute_backend is None:  # the router's VariableKRouting says; "auto" under a Megatron router
            permute_backend = getattr(getattr(self.router, "routing", None), "permute_backend", "auto")
        self.token_dispatcher = VariableKAllToAllDispatcher(
            self.num_local_experts, self.local_expert_indices, config, pg_collection,
            max_slots=getattr(self.router, "max_slots", config.moe_router_topk), permute_backend=permute_backend)
        self._shared_input: Optional[torch.Tensor] = None
        self._shared_output: Optional[torch.Tensor] = None

    # Megatron's forward computes the shared experts first, before routing. When one call runs the whole layer
    # (fwd_execution_map holds every stage; a partial CUDA-graph capture splits them) they move into dispatch,
    # after token_dispatch has issued the exchange and before the experts wait for it; postprocess adds them as
    # Megatron does.
    def _whole_forward(self) -> bool:
        stages = getattr(self, "fwd_execution_map", ("route", "expert_compute", "postprocess"))
        return all(s in stages for s in ("route", "expert_compute", "postprocess"))

    def shared_experts_compute(self, hidden_states: torch.Tensor):
        if self.use_shared_expert and not self.shared_expert_overlap and self._whole_forward():
            self._shared_input = hidden_states
            return None
        return super().shared_experts_compute(hidden_states)

    def dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        pending = super().dispatch(hidden_states, probs)  # issued, not waited
        x, self._shared_input = self._shared_input, None
        if x is not None:  # computes while the rows travel
            self._shared_output = super().shared_experts_compute(x)
        return pending

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        if shared_expert_output is None:
            shared_expert_output, self._shared_output = self._shared_output, None
        return super().postprocess(output, shared_expert_output)
