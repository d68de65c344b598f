"""moe_train.parallel: device mesh, expert-parallel all-to-all dispatcher, gradient reduction (docs/parallel.md)."""

from moe_train.parallel.dispatcher import AllToAllDispatcher
from moe_train.parallel.distributed import (ParallelContext, RendezvousError, destroy_distributed, init_distributed,
                                            validate_layout)
from moe_train.parallel.exchange import CountExchange, DispatchStats
from moe_train.parallel.parallelize import (all_reduce_mean, all_reduce_sum, clip_grad_norm_, full_grads,
                                            full_state_dict, parallelize_model)

__all__ = ["AllToAllDispatcher", "CountExchange", "DispatchStats", "ParallelContext", "RendezvousError",
           "destroy_distributed", "init_distributed", "validate_layout", "all_reduce_mean", "all_reduce_sum",
           "clip_grad_norm_", "full_grads", "full_state_dict", "parallelize_model"]
