"""moe_train.parallel: device mesh, expert-parallel all-to-all dispatcher, gradient reduction (docs/parallel.md).

distributed.py  process groups and the (dp, ep) device mesh        dispatcher.py / exchange.py  all-to-all dispatch
parallelize.py  expert sharding + dispatchers + FSDP2 (parallelize_model)
collectives.py  all_reduce_sum / all_reduce_mean / clip_grad_norm_  state.py  full_state_dict / full_grads / DCP view
launch.py       torchrun / Slurm / MPI environment                   megatron/  the Megatron-Core adapter
"""

from moe_train.parallel.collectives import all_reduce_mean, all_reduce_sum, clip_grad_norm_
from moe_train.parallel.dispatcher import AllToAllDispatcher
from moe_train.parallel.distributed import (
                                            ParallelContext,
                                            RendezvousError,
                                            destroy_distributed,
                                            init_distributed,
                                            validate_layout,
)
from moe_train.parallel.exchange import CountExchange, DispatchStats
from moe_train.parallel.parallelize import parallelize_model, shard_experts
from moe_train.parallel.state import checkpoint_view, full_grads, full_state_dict

__all__ = ["AllToAllDispatcher", "CountExchange", "DispatchStats", "ParallelContext", "RendezvousError",
           "destroy_distributed", "init_distributed", "validate_layout", "all_reduce_mean", "all_reduce_sum",
           "clip_grad_norm_", "checkpoint_view", "full_grads", "full_state_dict", "parallelize_model", "shard_experts"]
