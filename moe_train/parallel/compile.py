"""train.compile: every decoder block compiled by torch.compile (torchtitan's per-block compile).

torchtitan's parallelisation order is activation checkpointing -> compile each block -> FSDP2, and so is
train/build.py's: the activation_checkpointing flag is set, then apply_compile, then parallelize_model. Per block,
not the whole model: the blocks share one structure, so one compiled graph serves them all, and the embedding,
head and loss stay eager.

Choices, and why they differ from torchtitan's where they do:
  * in place (``block.compile()``), not ``torch.compile(block)`` registered back into ``model.layers``: a wrapper
    module would rename every parameter ``layers.0._orig_mod.*``, and moe_train's checkpoints, state views and
    fingerprints key on the plain names. Compiling ``_call_impl`` means the FSDP2 hooks of the block (and of its
    experts unit) run inside the compiled frame; Dynamo skips them (torch._dynamo.config.skip_fsdp_hooks, on by
    default): they run eagerly between graphs.
  * ``fullgraph=False``: an MoE block is not one graph. Each MoE layer reads its true-row count on the host once
    (kernels/permute.py build_permutation's ``.tolist()``, which sizes the permutation; torch.bincount before it
    has a data-dependent shape too), and the expert-parallel dispatcher exchanges counts and rows with the other
    ranks (parallel/dispatcher.py). Dynamo breaks the graph there and resumes after.
  * no ``capture_scalar_outputs`` (torchtitan sets it for its token-choice MoE): the host count feeds a Python
    branch (the id check, ``if num_bad: raise``), which an unbacked symbol cannot decide: torch 2.13 then fails with
    GuardOnDataDependentSymNode instead of breaking the graph.
  * fp32 expert GEMMs run outside the graph: torch 2.13's fake (meta) kernel of torch._grouped_mm accepts bf16
    operands only (its CUDA fused kernel's rule), although eager runs fp32 too (CPU, CUDA's per-expert fallback),
    so tracing an fp32 call fails. With a compute dtype other than bf16, Dynamo is told to leave torch._grouped_mm
    out of its graphs (a graph break around each expert GEMM: the same op, run eagerly). bf16 (CUDA training, or
    train.precision: bf16) keeps it in the graph. The switch is process-wide: a later bf16 compile in the same
    process still computes the same values, with those extra breaks.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from moe_train.config import TrainConfig

logger = logging.getLogger(__name__)


def compute_is_bf16(train: TrainConfig, device: torch.device) -> bool:
    """The trainer's compute dtype rule (train.precision: auto = bf16 on CUDA, fp32 on CPU)."""
    return train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")


def apply_compile(model: nn.Module, train: TrainConfig, device: torch.device) -> None:
    """Compiles every block of ``model.layers`` in place when ``train.compile`` is set (see the module docstring);
    lazily: the first forward of each block traces and compiles it."""
    if not train.compile:
        return
    blocks = list(getattr(model, "layers", []))
    assert blocks, "apply_compile needs a model with decoder blocks in model.layers"
    import torch._dynamo  # only here: importing Dynamo costs seconds, and a run without compile never needs it

    if not compute_is_bf16(train, device):
        torch._dynamo.disallow_in_graph(torch._grouped_mm)  # fp32 has no trace rule in torch 2.13: run it eagerly
        # Dynamo then warns once that it "does not know how to trace" the op: that is the intent, said above
        warnings.filterwarnings("ignore", message=r"Dynamo does not know how to trace the builtin "
                                r"`torch\._VariableFunctionsClass\._grouped_mm", category=UserWarning)
    for block in blocks:
        block.compile(fullgraph=False)
    logger.info(f"torch.compile: {len(blocks)} decoder blocks compiled in place (fullgraph=False, "
                f"{'bf16' if compute_is_bf16(train, device) else 'fp32: expert GEMMs eager'})")
