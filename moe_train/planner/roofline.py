"""Time per optimizer step from the GPU table: each term at the hardware's peak, the bounding term, MFU.

  compute   executed FLOPs / peak: forward FLOPs (moe_train/model/flops.py at the expected true experts) x tokens x
            passes: forward 1, backward 1 (input gradients) + the trainable share (weight gradients; ~1 when
            everything trains, ~0 for LoRA on a frozen base), +1 forward with activation checkpointing; expert
            GEMMs at the FP8 peak when model.moe.gemm_backend is an FP8 one
  hbm       the weights each pass reads (gathered compute-dtype copies) plus activations written and read once
  a2a       intra-node bytes / NVLink + inter-node bytes / NIC (parallel/ all-to-alls are not overlapped with
            compute: README "Not done")
  fsdp      all-gather + reduce-scatter, intra / NVLink + inter / NIC
``serial`` adds the terms (the code overlaps little: one FSDP unit for all non-expert weights, blocking
all-to-alls); ``roofline`` is the largest term alone (perfect overlap). Both are lower bounds: real kernels reach a
fraction of peak (../shared/REFERENCE.md section 5b: ~455 TFLOP/s per H100 for Mixtral-8x22B in Megatron, 46 %).
MFU = model FLOPs (forward + backward, no recompute) / (serial time x bf16 peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_train.planner.hardware import GPUSpec
from moe_train.planner.traffic import Traffic


@dataclass
class StepTime:
    terms: dict = field(default_factory=dict)  # seconds per term
    serial_s: float = 0.0
    roofline_s: float = 0.0
    bound_by: str = ""
    mfu: float = 0.0
    model_flops: float = 0.0
    executed_flops: float = 0.0


def step_time(gpu: GPUSpec, dense_flops: float, expert_flops: float, model_flops: float, fp8_experts: bool,
              hbm_bytes: float, traffic: Traffic, bf16: bool) -> StepTime:
    peak = gpu.bf16_tflops * 1e12 if bf16 else gpu.bf16_tflops * 1e12 / 2  # fp32 GEMMs as TF32: half of bf16
    expert_peak = gpu.fp8_tflops * 1e12 if fp8_experts and gpu.fp8_tflops else peak
    terms = {
        "compute": dense_flops / peak + expert_flops / expert_peak,
        "hbm": hbm_bytes / gpu.hbm_bytes_per_s,
        "a2a_nvlink": traffic.a2a_intra / gpu.nvlink_bytes_per_s,
        "a2a_ib": traffic.a2a_inter / gpu.nic_bytes_per_s,
        "fsdp_nvlink": traffic.fsdp_intra / gpu.nvlink_bytes_per_s,
        "fsdp_ib": traffic.fsdp_inter / gpu.nic_bytes_per_s,
    }
    serial = terms["compute"] + terms["a2a_nvlink"] + terms["a2a_ib"] + terms["fsdp_nvlink"] + terms["fsdp_ib"]
    serial = max(serial, terms["hbm"])
    bound = max(terms, key=terms.get)
    return StepTime(terms=terms, serial_s=serial, roofline_s=max(terms.values()), bound_by=bound,
                    mfu=model_flops / (serial * gpu.bf16_tflops * 1e12) if serial > 0 else 0.0,
                    model_flops=model_flops, executed_flops=dense_flops + expert_flops)
