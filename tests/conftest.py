"""Session-wide test setup.

TRITON_INTERPRET=1 before anything imports triton: triton decides at decoration time whether @triton.jit functions
(its own tl.sum, tl.cumsum, ... included) are interpreted, and torch's dynamo/inductor (pulled in by FSDP / DCP in
other tests) may import triton first. CPU tests can only run the interpreted kernels; the GPU path is checked on a
GPU (see docs/kernels.md).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
