"""Session-wide test setup.

TRITON_INTERPRET=1 before anything imports triton: triton decides at decoration time whether @triton.jit functions
(its own tl.sum, tl.cumsum, ... included) are interpreted, and torch's dynamo/inductor (pulled in by FSDP / DCP in
other tests) may import triton first. CPU tests can only run the interpreted kernels; the GPU path is checked on a
GPU (see docs/kernels.md).
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    """-q hides pytest's header: print the machine and versions lines anyway (the README's command uses -q)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        for line in pytest_report_header(session.config):
            reporter.write_line(line)


def pytest_report_header(config):
    """Which machine kind ran the suite: fp32 GEMM kernels (and so the last bits of results) differ between CPUs."""
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    isa = sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")})
    return [f"cpu flags: {' '.join(isa) or 'unknown'}; torch cpu capability: {torch.backends.cpu.get_cpu_capability()}",
            "versions: " + ", ".join(f"{name} {_version(name)}" for name in VERSIONED)]


# What a failing run ran against (a fresh install resolves the newest release in each range of setup.py).
VERSIONED = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "deepspeed", "megatron-core", "triton",
             "lm-eval", "numpy")


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP stalls when the machine is shared (restored afterwards). Modules opt
    in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
