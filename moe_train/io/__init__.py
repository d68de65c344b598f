"""Models and checkpoints on disk: Hugging Face import / export, model files, resumable checkpoints, atomic writes.

``load_any`` is the one loader for every accepted model format (io/load.py).
"""

from moe_train.io.load import load_any

__all__ = ["load_any"]
