"""moe_train.kernels: permutation and grouped GEMM, each with a plain-torch reference beside it."""

from moe_train.kernels.grouped_gemm import grouped_mm
from moe_train.kernels.permute import Permutation, build_permutation, permute, unpermute_combine

__all__ = ["grouped_mm", "Permutation", "build_permutation", "permute", "unpermute_combine"]
