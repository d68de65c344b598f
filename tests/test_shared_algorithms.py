"""Issue 11: one implementation of each algorithm for the native and the Megatron paths.

routing/balancing.py (balancing loss with reduced counts / token count / padding / null bucket, masked z-loss),
routing/null_experts.py::null_gate_from_true, parallel/exchange.py::CountExchange, routing/protocols.py.
Shape legend: T tokens, N scored experts (E true + Z null), E true experts, K slots, D hidden.
"""

from __future__ import annotations

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.model.experts import GroupedExperts
from moe_train.model.moe_layer import LocalDispatcher
from moe_train.parallel.dispatcher import AllToAllDispatcher
from moe_train.parallel.exchange import CountExchange
from moe_train.routing import Dispatcher, Experts, Router, build_router
from moe_train.routing.balancing import load_balancing_loss, null_bucket_counts, router_z_loss
from moe_train.routing.null_experts import null_gate_from_true


def _probs(T=12, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, N, generator=g), dim=-1)


def test_balancing_loss_group_token_count_and_padding():
    probs_TN = _probs()
    counts_N = torch.tensor([5, 3, 0, 7, 2, 7])
    local = load_balancing_loss(probs_TN, counts_N)
    # dividing the probability SUM by the token count is the local mean
    assert torch.allclose(load_balancing_loss(probs_TN, counts_N, num_tokens=torch.tensor(12.0)), local)
    # padding leaves the padded tokens out of P: the loss of the valid tokens alone
    pad_T = torch.zeros(12, dtype=torch.bool)
    pad_T[8:] = True
    assert torch.allclose(load_balancing_loss(probs_TN, counts_N, padding_mask_T=pad_T),
                          load_balancing_loss(probs_TN[:8], counts_N))


def test_balancing_loss_is_megatrons_switch_loss_for_fixed_k():
    T, E, k = 10, 4, 2
    probs_TE = _probs(T, E, seed=1)
    idx_TK = torch.topk(probs_TE, k).indices
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    megatron = (probs_TE.sum(0) * counts_E).sum() * (E / (k * T * T))  # switch_load_balancing_loss_func, coeff 1
    ours = load_balancing_loss(probs_TE, counts_E, num_tokens=torch.tensor(float(T)))
    assert torch.allclose(ours, megatron, rtol=1e-6, atol=0)


def test_null_bucket_needs_only_the_null_total():
    probs_TN = _probs(N=6)
    E, Z = 3, 3
    counts_N = torch.tensor([4, 1, 2, 5, 0, 3])
    spread = null_bucket_counts(counts_N[:E].double(), counts_N[E:].sum().double(), Z)
    assert torch.allclose(load_balancing_loss(probs_TN, spread, num_null=Z),
                          load_balancing_loss(probs_TN, counts_N, num_null=Z))
    assert torch.equal(null_bucket_counts(counts_N[:E], torch.tensor(9), 0), counts_N[:E])  # no null bucket


def test_masked_z_loss():
    g = torch.Generator().manual_seed(2)
    logits_TN = torch.randn(9, 5, generator=g)
    pad_T = torch.tensor([False, True, False, False, True, False, False, False, True])
    assert torch.allclose(router_z_loss(logits_TN, pad_T), router_z_loss(logits_TN[~pad_T]))
    assert torch.equal(router_z_loss(logits_TN, torch.zeros(9, dtype=torch.bool)), router_z_loss(logits_TN))
    assert router_z_loss(logits_TN, torch.ones(9, dtype=torch.bool)).item() == 0.0


def test_null_gate_from_true_names_the_callers_field():
    w_ED = torch.randn(4, 8)
    assert torch.equal(null_gate_from_true(w_ED, 8), torch.cat([w_ED, w_ED]))
    with pytest.raises(ValueError, match="multiple of num_moe_experts"):
        null_gate_from_true(w_ED, 6, "num_moe_experts")


def test_count_exchange_on_one_rank():
    send_E = torch.tensor([3, 0, 2, 1])
    ex = CountExchange.run(send_E, None, ep_size=1, ep_rank=0, extra=torch.tensor([6]))
    assert ex.send_counts_E == [3, 0, 2, 1] and ex.recv_counts_PL == [[3, 0, 2, 1]] and ex.extra == [6]
    assert ex.send_P == ex.recv_P == [6] and ex.recv_counts_L() == [3, 0, 2, 1]
    x_ND = torch.randn(6, 5)
    assert ex.order_R is None and ex.dispatch_rows(x_ND) is x_ND and ex.combine_rows(x_ND) is x_ND
    assert ex.to_expert_major(x_ND) is x_ND and ex.from_expert_major(x_ND) is x_ND
    st = ex.stats(row_bytes=20)
    assert (st.rows_sent, st.rows_received, st.rows_sent_remote, st.bytes_sent_remote) == (6, 6, 0, 0)


def test_router_and_dispatcher_protocols():
    for router in ("topk", "null_experts", "adak"):
        cfg = MoEConfig(router=router, num_experts=4, top_k=2, num_null_experts=4 if router == "null_experts" else 0)
        assert isinstance(build_router(8, cfg), Router)
    assert isinstance(LocalDispatcher(), Dispatcher)
    assert isinstance(GroupedExperts(4, 8, 16), Experts)
    assert callable(AllToAllDispatcher.__call__)
