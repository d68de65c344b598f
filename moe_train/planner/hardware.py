"""GPU and interconnect figures the planner's roofline uses: one table, every number with its source.

Peak figures are the vendors' dense (no 2:4 sparsity) tensor-core numbers per GPU; links are per direction.
Sources (docs/references.md / ../shared/REFERENCE.md section 6 "Physical limits" for H100):
  H100 SXM  bf16 989 TFLOP/s, FP8 1979, HBM3 3.35 TB/s, 80 GB; NVLink 4: 900 GB/s bidirectional = ~450 GB/s per
            direction; InfiniBand NDR 400 Gb/s = 50 GB/s per NIC, one NIC per GPU (REFERENCE.md section 6; NVIDIA
            H100 datasheet).
  H200 SXM  same compute as H100 (989 / 1979), HBM3e 4.8 TB/s, 141 GB (NVIDIA H200 datasheet; ../shared/GPU.md
            quotes the same 4.8 TB/s); NVLink 4 and NDR as H100 (HGX H200).
  A800 SXM  A100's compute (bf16 312 TFLOP/s, no FP8), HBM2e 2.04 TB/s, 80 GB; NVLink capped at 400 GB/s
            bidirectional = 200 GB/s per direction (the export variant); HDR 200 Gb/s = 25 GB/s per NIC (the Ada-K
            paper's cluster, arXiv 2410.10456; NVIDIA A800 datasheet).
  A100 SXM  bf16 312, HBM2e 2.04 TB/s, 80 GB, NVLink 3 600 GB/s bidirectional = 300 per direction, HDR 25 GB/s.
  B200      bf16 2250 TFLOP/s dense, FP8 4500, HBM3e 8 TB/s, 180 GB; NVLink 5 1.8 TB/s bidirectional = 900 GB/s per
            direction; ConnectX-8 / XDR 800 Gb/s = 100 GB/s per NIC (NVIDIA DGX B200 datasheet; HGX B200 figures).
Measured all-to-all and GEMM efficiencies are far below these (REFERENCE.md: ~95 % of NVLink for the best MoE
all-to-all, 43-58 GB/s per 400 Gb/s NIC, FP8 grouped GEMM ~66 % of peak): the roofline is a lower bound on time.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: float  # usable HBM capacity (the marketing GB, 1e9 bytes)
    bf16_tflops: float  # dense
    fp8_tflops: float  # dense; 0 = no FP8 tensor cores
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, per direction
    nic_bytes_per_s: float  # InfiniBand per NIC (one NIC per GPU), per direction


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM 80GB", 80 * GB, 989.0, 1979.0, 3.35e12, 450 * GB, 50 * GB),
    "h200": GPUSpec("H200 SXM 141GB", 141 * GB, 989.0, 1979.0, 4.8e12, 450 * GB, 50 * GB),
    "a800": GPUSpec("A800 SXM 80GB", 80 * GB, 312.0, 0.0, 2.04e12, 200 * GB, 25 * GB),
    "a100": GPUSpec("A100 SXM 80GB", 80 * GB, 312.0, 0.0, 2.04e12, 300 * GB, 25 * GB),
    "b200": GPUSpec("B200 180GB", 180 * GB, 2250.0, 4500.0, 8.0e12, 900 * GB, 100 * GB),
}


def gpu_spec(name: str) -> GPUSpec:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r} is not in the planner's table: use one of {sorted(GPUS)} "
                         f"(moe_train/planner/hardware.py; add a row with its sources to plan another)")
    return GPUS[key]


@dataclass
class Cluster:
    world: int
    gpus_per_node: int
    gpu: str = "h100"

    @property
    def nodes(self) -> int:
        return -(-self.world // self.gpus_per_node)
