"""Ahead-of-time compilation of every Triton kernel of moe_train.kernels for real GPUs, without one: registers and
spills per kernel, shape, dtype and architecture, as ptxas reports them.

    env -u TRITON_INTERPRET python -m moe_train.kernels.aot_report [--arch 90 100] [--quick]   # JSON on stdout

How: the launch wrappers (triton_routing.route, triton_permute.build_rows / scatter_rows / combine_rows) run on
small CPU tensors of the real dtypes with every kernel replaced by a recorder, so the recorded launches carry
exactly the block sizes and num_warps the wrappers' heuristics choose (what is compiled here is what runs). Each
launch is specialised the way triton's launcher does it (16-divisibility of pointers and ints, ints equal to 1
as constants) and compiled with triton.compile for GPUTarget("cuda", arch, 32); triton's own ptxas call (the
bundled ptxas, ``-v``) reports registers and spill bytes, read from its log (knobs.nvidia.dump_ptxas_log).
Only T (tokens) is small: no kernel's code depends on it beyond that specialisation, and T here is a multiple of
16 as in training.

TRITON_INTERPRET must be unset in this process before triton is first imported (the test suite sets it: the test
runs this module in a subprocess without it). tests/test_kernels_aot.py asserts zero spills at every shape below.
Shape legend: T tokens, N scored experts, E experts (permutation), K picks per token, D hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

ARCHS = (90, 100)  # H100 / H200 (sm_90a) and B200 (sm_100a)
# (N scored experts, K picks): Mixtral (8, 2), Qwen / OLMoE-like 64 and 128, DeepSeek-V2 (160, 6), DeepSeek-V3
# (256, 8), LongCat-Flash (512 true + 256 zero experts = 768, 12); K = 12 everywhere it fits as the worst case.
ROUTING_SHAPES = ((8, 2), (8, 8), (64, 6), (64, 12), (128, 8), (128, 12), (160, 6), (160, 12), (256, 8), (256, 12),
                  (768, 12))
# (E experts of the permutation, K): global or local expert counts up to LongCat's 768 scored experts.
BUILD_SHAPES = ((8, 2), (64, 8), (128, 8), (160, 6), (256, 8), (512, 12), (768, 12))
ROW_D = (64, 4096, 5120, 7168)  # hidden sizes: small, Llama / Mixtral 4096, Qwen 5120, DeepSeek-V3 / LongCat 7168
ROW_K = (1, 2, 8, 12)
DTYPES = ("bfloat16", "float32")
_T = 64  # tokens of the recorded launches (a multiple of 16, like training batches)


def _require_compiled_triton():
    import triton

    if triton.knobs.runtime.interpret:
        raise RuntimeError("aot_report needs TRITON_INTERPRET unset before triton is imported (the kernels would be "
                           "defined for the interpreter): run it in a fresh process without it")
    return triton


def nvidia_backend_missing() -> str:
    """'' when triton can compile for NVIDIA here (backend and bundled ptxas present), else the reason."""
    try:
        import triton.backends.nvidia.compiler as nvc

        path = nvc.get_ptxas(90).path
    except Exception as e:  # ImportError, or a knob that cannot find ptxas
        return f"triton has no usable NVIDIA backend / ptxas: {type(e).__name__}: {e}"
    if not path or not os.path.exists(path):
        return f"triton's ptxas is missing ({path!r})"
    return ""


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


def kernel_names() -> list[str]:
    """Every @triton.jit kernel of the modules this report covers (the test checks each one was compiled)."""
    from moe_train.kernels import triton_permute, triton_routing

    return sorted(n for m in (triton_routing, triton_permute) for n in _kernels(m))


def _kernels(module) -> list[str]:
    return [n for n, v in vars(module).items() if type(v).__name__ == "JITFunction"]


@contextlib.contextmanager
def _recording(module, launches: list):
    names = _kernels(module)
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], launches))
        yield
    finally:
        for n, v in saved.items():
            setattr(module, n, v)


def routing_launches(quick: bool = False) -> Iterator[tuple[dict, list]]:
    """(shape, recorded launches) of triton_routing.route at every ROUTING_SHAPES x dtype x variant."""
    import torch

    from moe_train.kernels import triton_routing as TR

    shapes = ROUTING_SHAPES[-2:] if quick else ROUTING_SHAPES
    # softmax + bias + renormalisation (LongCat, null experts), sigmoid + bias (DeepSeek-V3 correction bias),
    # softmax without bias or renormalisation (Qwen); the flags change the code a little, the tile not at all.
    variants = (("softmax", True, True), ("sigmoid", True, True), ("softmax", False, False))
    for N, K in shapes:
        for dtype in DTYPES:
            # the other variants at the two largest shapes only: compile time
            for score_func, use_bias, norm in (variants if (N, K) in ROUTING_SHAPES[-2:] else variants[:1]):
                logits = torch.empty(_T, N, dtype=getattr(torch, dtype))
                bias = torch.zeros(N) if use_bias else None
                launches: list = []
                with _recording(TR, launches):
                    TR.route(logits, K, N * 2 // 3 if N > 8 else N, bias, norm, score_func)
                yield dict(kernel="route", N=N, K=K, dtype=dtype, score=score_func, bias=use_bias, norm=norm), launches


def permute_launches(quick: bool = False) -> Iterator[tuple[dict, list]]:
    """(shape, recorded launches) of triton_permute's build (per E, K) and row kernels (per D, K, dtype, job)."""
    import torch

    from moe_train.kernels import triton_permute as TP

    for E, K in (BUILD_SHAPES[-2:] if quick else BUILD_SHAPES):
        idx = torch.zeros(_T, K, dtype=torch.int64)
        launches: list = []
        with _recording(TP, launches):
            TP.build_rows(idx, E, num_rows=_T * K)  # num_rows: no host read of the (unrun) histogram
        yield dict(kernel="build", E=E, K=K), launches
    for D in (ROW_D[-1:] if quick else ROW_D):
        for K in (ROW_K[-1:] if quick else ROW_K):
            for dtype in DTYPES:
                dt = getattr(torch, dtype)
                x, rows = torch.empty(_T, D, dtype=dt), torch.zeros(_T, K, dtype=torch.int64)
                y, w = torch.empty(_T * K, D, dtype=dt), torch.empty(_T, K, dtype=torch.float32)
                jobs: dict[str, Callable[[], Any]] = {  # the jobs of PermuteFn / UnpermuteCombineFn, fwd and bwd
                    "permute": lambda: TP.scatter_rows(x, rows, _T * K),
                    "permute_bwd": lambda: TP.combine_rows(y, rows),
                    "combine": lambda: TP.combine_rows(y, rows, w),
                    "combine_bwd": lambda: TP.scatter_rows(x, rows, _T * K, w, y_ND=y),
                    "combine_bwd_w_only": lambda: TP.scatter_rows(x, rows, _T * K, w, y_ND=y, write_rows=False),
                }
                for job, run in jobs.items():
                    launches = []
                    with _recording(TP, launches):
                        run()
                    yield dict(kernel="rows", job=job, D=D, K=K, dtype=dtype), launches


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(fn, args: tuple, kwargs: dict, arch: int, cache: dict | None = None) -> dict:
    """Compile one recorded launch for sm_<arch> as triton's launcher would; ptxas's registers and spills.
    ``cache``: results by compile key; shapes that specialise to the same kernel (e.g. D 4096 / 5120 / 7168 with the
    same block sizes) compile once."""
    triton = _require_compiled_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The launcher's own specialisation (JITFunction.run: binder, then _pack_args), without a device.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    key = (src.hash(), options.hash(), arch)
    if cache is not None and key in cache:
        return dict(cache[key], cached=True)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # triton prints ptxas's -v log with dump_ptxas_log
        compiled = triton.compile(src, target=target, options=options.__dict__)
    text = log.getvalue()
    regs, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v report for {fn.__name__} on sm_{arch}:\n{text[-2000:]}")
    res = dict(regs=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), num_warps=compiled.metadata.num_warps,
                shared=compiled.metadata.shared)
    if cache is not None:
        cache[key] = res
    return res


def _meta(kwargs: dict) -> dict:
    """The launch's block sizes and num_warps (ints and bools only)."""
    return {k: v for k, v in kwargs.items() if isinstance(v, (int, bool)) and not isinstance(v, type)}


def report(archs=ARCHS, quick: bool = False, only: tuple = ()) -> list[dict]:
    """One row per (kernel launch, shape, arch): the shape, the launch's meta-parameters, registers and spills.
    ``only``: the shape kinds to compile ("route", "build", "rows"; all when empty)."""
    triton = _require_compiled_triton()
    rows, cache = [], {}
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cache hit would run no ptxas, so report nothing
        for shape, launches in (*routing_launches(quick), *permute_launches(quick)):
            if only and shape["kernel"] not in only:
                continue
            for fn, _grid, args, kwargs in launches:
                for arch in archs:
                    t0 = time.perf_counter()
                    res = compile_launch(fn, args, kwargs, arch, cache)
                    rows.append(dict(shape, fn=fn.__name__, arch=f"sm_{arch}", **{**_meta(kwargs), **res},
                                     seconds=round(time.perf_counter() - t0, 2)))
                    logger.info("%s", rows[-1])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--quick", action="store_true", help="the largest shapes only")
    p.add_argument("--only", nargs="+", default=[], choices=["route", "build", "rows"], help="these kernels only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    why = nvidia_backend_missing()
    if why:
        json.dump({"skip": why}, sys.stdout)
        return 0
    t0 = time.perf_counter()
    rows = report(tuple(a.arch), a.quick, tuple(a.only))
    json.dump({"rows": rows, "kernels": kernel_names(), "seconds": round(time.perf_counter() - t0, 1)}, sys.stdout,
              indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
