"""Rank-side code of the planner tests: the REAL Trainer's optimizer step measured with torch's MemTracker (every
tensor storage a step allocates, by dispatch: parameters, gradients, optimizer state, activations, temporaries,
FSDP2's all-gather and reduce-scatter buffers alike), and the planner's prediction for the same rank.

The measured figure is the peak of step 2 (step 1 creates the optimizer state lazily). The planner is run in the
parent process (it needs its own fake process group), from the same config.
"""

from __future__ import annotations

import copy

import torch

from moe_train.config import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig


def small_config(router: str, precision: str, ac: bool, ep: int, world: int, out_dir: str, *, lora: bool = False,
                 accum: int = 1, capacity=None) -> Config:
    """A model where every memory term matters: experts, attention, vocabulary and activations of similar size."""
    moe = MoEConfig(router=router, num_experts=8, top_k=2 if router != "null_experts" else 4,
                    num_null_experts=8 if router == "null_experts" else 0, baseline_top_k=2 if router == "null_experts" else None,
                    capacity_factor=capacity)
    model = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=128, moe=moe)
    train = TrainConfig(steps=2, batch_size=4 * world * accum, seq_len=64, grad_accum_steps=accum,
                        precision=precision, activation_checkpointing=ac, out_dir=out_dir, checkpoint_every=0,
                        tensorboard=False, warmup_steps=0, log_every=1)
    if lora:
        train.lora_rank, train.trainable = 4, ["router\\.", "lora_"]
    return Config(model=model, train=train, data=DataConfig(kind="synthetic", num_sequences=64, val_sequences=0),
                  parallel=ParallelConfig(ep=ep, world_size=world))


def family_config(family: str, ac: bool, out_dir: str, precision: str = "fp32") -> Config:
    """Tiny models of the layer kinds beyond Mixtral's, one process. ``deepseek_v3``: MLA with a low-rank query, a
    dense first layer, one ungated shared expert, sigmoid scores with noaux_tc groups, routed scaling and the
    correction bias. ``longcat_flash``: two MLA sublayers with two dense MLPs per layer and a shortcut MoE with
    identity zero-computation experts under a compute budget. q/k head dim = v head dim (8 + 8 = 16): torch's CPU
    SDPA then runs the flash kernel, as CUDA's fused kernels do at the real sizes (activations.py: MLA)."""
    mla = dict(num_heads=4, num_kv_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=16)
    if family == "deepseek_v3":
        moe = MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, use_expert_bias=True, expert_bias_rate=1e-3)
        model = ModelConfig(family=family, vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=3,
                            first_k_dense_replace=1, dense_intermediate_size=160, n_shared_experts=1, max_seq_len=128,
                            moe=moe, **mla)
    else:
        assert family == "longcat_flash", family
        moe = MoEConfig(router="null_experts", num_experts=8, num_null_experts=4, null_kind="identity", top_k=3,
                        norm_topk_prob=False, routed_scaling_factor=2.0, use_expert_bias=True, expert_bias_rate=1e-3,
                        target_true_experts=2.0)
        model = ModelConfig(family=family, vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                            dense_intermediate_size=160, max_seq_len=128, moe=moe, **mla)
    train = TrainConfig(steps=2, batch_size=4, seq_len=64, precision=precision, activation_checkpointing=ac,
                        out_dir=out_dir, checkpoint_every=0, tensorboard=False, warmup_steps=0, log_every=1)
    return Config(model=model, train=train, data=DataConfig(kind="synthetic", num_sequences=64, val_sequences=0),
                  parallel=ParallelConfig(ep=1, world_size=1))


def measure_step(cfg: Config, ctx=None) -> dict:
    """Peak bytes (MemTracker) of the second optimizer step of the real Trainer on this rank, with its counts."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from moe_train.parallel.distributed import ParallelContext
    from moe_train.train.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(cfg, ctx or ParallelContext())
    trainer.model.train()
    trainer.train_step(1)
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.opt)
    with tracker:
        record = trainer.train_step(2)
    peak = tracker.get_tracker_snapshot("peak")
    dev = next(iter(peak))
    layers = trainer.model.layers
    stats = [getattr(layer.moe.dispatcher, "last", None) for layer in layers if layer.moe is not None]
    return {"peak": peak[dev]["Total"], "by_kind": dict(peak[dev]),
            "true_experts": record["true_experts_per_token"],
            "rows_recv": [s.rows_received for s in stats if s is not None],
            "rows_sent": [s.rows_sent for s in stats if s is not None],
            "a2a": [{"send_counts_E": s.send_counts_E, "bytes_sent_remote": s.bytes_sent_remote}
                    for s in stats if s is not None]}


def measure_alone(cfg_dict: dict) -> dict:
    """measure_step in a process of its own (tests/ep_workers.spawn with one rank), as a one-process job runs: the
    suite's earlier tests in the pytest process leave allocations and settings behind that MemTracker would see."""
    from moe_train.config import from_dict

    torch.set_num_threads(1)
    return measure_step(from_dict(Config, copy.deepcopy(cfg_dict)))


def measure_ranks(cases: list[dict], runs_dir: str) -> list[dict]:
    """In a spawned gloo rank: every case (ep, world share the same processes) -> this rank's measurement."""
    import torch.distributed as dist

    from moe_train.parallel.distributed import init_distributed

    results = []
    for i, case in enumerate(cases):
        cfg = small_config(out_dir=f"{runs_dir}/case{i}", **case)
        ctx = init_distributed(copy.deepcopy(cfg.parallel), cfg.model.moe.num_experts) if i == 0 else \
            _context(cfg.parallel.ep)
        results.append(measure_step(cfg, ctx))
        dist.barrier()
    return results


def _context(ep: int):
    """Another (dp, ep) mesh over the already initialised world (init_distributed's layout)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from moe_train.parallel.distributed import ParallelContext

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    dp_idx, ep_idx = mesh.get_coordinate()
    return ParallelContext(world_size=world, rank=rank, local_rank=rank, dp_size=world, dp_rank=rank, ep_size=ep,
                           ep_rank=ep_idx, device=torch.device("cpu"), mesh=mesh, ep_group=mesh.get_group("ep"),
                           edp_group=mesh.get_group("dp"), edp_size=world // ep, edp_rank=dp_idx,
                           world_mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu", mesh_dim_names=("world",)),
                           backend="gloo")


class StorageTracker:
    """Peak bytes of live tensor storages: the ones that exist on entry (``track``) plus every storage an op
    allocates inside the block, released when its last tensor dies. For models with frozen parameters, which torch's
    MemTracker cannot take (it registers a gradient hook on every parameter)."""

    def __init__(self):
        import weakref

        self._weakref = weakref
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, *tensors) -> None:
        for t in tensors:
            self._add(t)

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        self._weakref.finalize(st, self._drop, key)

    def _drop(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    tracker._add(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
