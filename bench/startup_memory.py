"""Peak resident memory per rank of a whole job (load + steps + final model.pt + HF export), against the rank's share
of the weights: the real-size path (moe_train/train/build.py) must keep every rank near its share.

    python bench/startup_memory.py                       # ~365M-parameter Mixtral folder, ep 4 on 4 gloo ranks
    python bench/startup_memory.py --hidden 256 --ffn 512 --layers 16 --vocab 4096   # the CI test's size

A transformers-made Mixtral folder (8 experts) is converted to AdaMoE on load (16 null experts, k 4), LoRA rank 8 on
attention and experts, routers + adapters training, fp32, then one optimizer step, the final model.pt (streamed
through rank 0) and the HF export (rank 0, one layer at a time). Each rank reports its resident memory after its
imports (``base_mb``) and its peak after them (Linux VmHWM, reset once the imports are done: ``peak_mb``); one JSON line per rank, then a summary line with
the whole fp32 model's size and the rank's share (weights / world: experts split over ep, the rest over FSDP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny_adamoe.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """VmHWM restarts from the current RSS (ru_maxrss cannot: it survives exec, so a spawned rank would report at
    least its parent's resident memory at fork time)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moe_train.config import apply_overrides, load_config
    from moe_train.train.trainer import train

    base = _status_mb("VmRSS")
    _reset_peak()
    train(apply_overrides(load_config(str(CONFIG)), overrides))
    peak = _status_mb("VmHWM")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "base_mb": base, "peak_mb": peak}))


def make_folder(folder: Path, hidden: int, ffn: int, layers: int, vocab: int, experts: int = 8) -> int:
    """A transformers-made Mixtral folder; returns its parameter count."""
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                     num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                     num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=256,
                                     tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return n


def measure(hidden: int, ffn: int, layers: int, vocab: int, world: int = 4, ep: int = 4,
            work: Path | None = None) -> dict:
    """Runs the job on ``world`` gloo ranks; returns {"ranks": [...], "params": n, "model_mb": fp32 size}."""
    work = Path(work or tempfile.mkdtemp(prefix="startup_memory_"))
    folder = work / "hf"
    n = make_folder(folder, hidden, ffn, layers, vocab)
    overrides = [f"train.init_from={folder}", f"parallel.ep={ep}", "train.lora_rank=8",
                 'train.trainable=["router\\\\.", "lora_"]', "train.steps=1", "train.batch_size=4",
                 "train.seq_len=32", "train.warmup_steps=0", "train.log_every=1", "train.export_hf=true",
                 "train.tensorboard=false", f"train.out_dir={work / 'run'}", "data.num_sequences=64",
                 "data.val_sequences=4", "train.precision=fp32"]
    # Transient tensors at real size (a layer, a gathered expert stack: GBs) are above glibc's largest dynamic mmap
    # threshold (32 MiB), so freeing them returns the memory; at this size they would land in the heap, where
    # fragmentation keeps them resident. A fixed threshold gives the ranks the real-size behaviour.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    mp.spawn(_rank, args=(world, _free_port(), overrides, str(work)), nprocs=world, join=True)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]
    return {"ranks": ranks, "params": n, "model_mb": n * 4 / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ep", type=int, default=4)
    a = p.parse_args(argv)
    res = measure(a.hidden, a.ffn, a.layers, a.vocab, a.world, a.ep)
    share = res["model_mb"] / a.world
    for r in res["ranks"]:
        above = r["peak_mb"] - r["base_mb"]
        print(json.dumps({**r, "above_import_mb": round(above, 1), "over_share": round(above / share, 2),
                          "over_whole_model": round(above / res["model_mb"], 3)}))
    print(json.dumps({"summary": True, "params": res["params"], "model_fp32_mb": round(res["model_mb"], 1),
                      "share_mb": round(share, 1), "world": a.world, "ep": a.ep, "dtype": "float32",
                      "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                      "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
