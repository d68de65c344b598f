"""Users' mistakes campaign (issue 17): tries every mistake below through the real command line, in a subprocess
each, and classifies what a user sees.

    python bench/mistakes.py                       # all of them, writes docs/mistakes.md
    python bench/mistakes.py --only C01,D05 --out -   # a few, table on stdout

Classes (CLASSES):
    clear-and-early   exit 2, no traceback, a one-line message that names the key / file (the entry's needles),
                      before any model or process group: for train / adak the "inputs checked" log line (printed by
                      moe_train.preflight just before the process groups and the model are made) is absent
    clear-but-late    the same message, but after the model was built (the marker was printed)
    unclear           a non-zero exit, no traceback, but the message does not name what it should
    traceback         a Python traceback on stderr
    silent            exit 0: the mistake was accepted
    hang              no exit within the timeout
Entries marked ``warn`` are faults that must be handled, not refused: exit 0 with a warning naming the thing counts
as clear-and-early.

Every run is tiny (a 1-layer model, 2 steps, CPU, seconds); the base model, the Hugging Face folder, the data folder
and one finished run are made once and shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
MARKER = "inputs checked"
CLASSES = ("clear-and-early", "clear-but-late", "unclear", "traceback", "silent", "hang")

TINY = """\
model:
  family: mixtral
  vocab_size: 64
  hidden_size: 32
  intermediate_size: 32
  num_layers: 1
  num_heads: 2
  num_kv_heads: 1
  max_seq_len: 64
  moe: {router: topk, num_experts: 4, top_k: 2}
train:
  steps: 2
  batch_size: 4
  seq_len: 16
  warmup_steps: 0
  log_every: 1
  tensorboard: false
  out_dir: OUT
data: {kind: synthetic, num_sequences: 32, val_sequences: 4}
"""


@dataclass
class Mistake:
    id: str
    what: str  # what the user did
    argv: Callable[["Env"], list[str]]  # moe-train arguments
    needles: tuple[str, ...]  # the message must contain every one
    env: dict = field(default_factory=dict)
    setup: Optional[Callable[["Env"], None]] = None
    warn: bool = False  # a fault to be handled: exit 0 with a warning naming the thing
    timeout: float = 90.0


class Env:
    """The shared assets of a campaign, in one work folder."""

    def __init__(self, work: Path):
        self.work = work
        self.cfg = work / "tiny.yaml"
        self.data = work / "data"
        self.model = work / "base" / "model.pt"
        self.hf = work / "hf"
        self.done = work / "done"  # a finished run with checkpoints
        self.n = 0

    def out(self) -> str:
        self.n += 1
        return str(self.work / "runs" / f"r{self.n}")

    def write(self, name: str, content, binary: bool = False) -> str:
        p = self.work / "files" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            p.write_bytes(content)
        else:
            p.write_text(content)
        return str(p)

    def yaml(self, name: str, extra: str = "", base: bool = True) -> str:
        text = (TINY.replace("OUT", self.out()) if base else "") + extra
        return self.write(name, text)

    def train(self, *sets: str, config: Optional[str] = None, out: bool = True) -> list[str]:
        argv = ["train", "--config", config or str(self.cfg)]
        if out:
            argv += ["--set", f"train.out_dir={self.out()}"]
        for s in sets:
            argv += ["--set", s]
        return argv

    def files(self, path: str, *sets: str) -> list[str]:
        return self.train("data.kind=files", f"data.path={path}", "data.val_sequences=2", *sets)

    def tokens(self, path: str, *sets: str) -> list[str]:
        return self.files(path, "data.token_field=tokens", *sets)


def _cli(argv: list[str], env: Optional[dict] = None, timeout: float = 600, cwd: Path = ROOT):
    full = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or k not in env:
            full.pop(k, None)
    return subprocess.run([sys.executable, "-m", "moe_train.cli", *argv], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def prepare(work: Path) -> Env:
    e = Env(work)
    work.mkdir(parents=True, exist_ok=True)
    e.cfg.write_text(TINY.replace("OUT", str(work / "runs" / "default")))
    code = f"""
import sys
from moe_train.config import load_config
from moe_train.model import build_model
from moe_train.io.model_file import save_model
from moe_train.io.hf import to_hf
cfg = load_config({str(e.cfg)!r})
m = build_model(cfg.model)
save_model(m, {str(e.model)!r})
to_hf(m, {str(e.hf)!r})
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    r = _cli(["generate-data", "--out", str(e.data), "--num-sequences", "32", "--val-sequences", "4", "--seq-len",
              "16", "--vocab-size", "64"])
    assert r.returncode == 0, r.stderr
    r = _cli(["train", "--config", str(e.cfg), "--set", f"train.out_dir={e.done}", "--set",
              "train.checkpoint_every=1", "--set", "train.keep_last=0"])
    assert r.returncode == 0, r.stderr
    return e


def _adak_done(e: Env) -> str:
    """An Ada-K run of one warm-start and one PPO step with a checkpoint after each (the base model's)."""
    out = e.out()
    r = _cli(["adak", "--config", str(e.cfg), "--set", f"train.init_from={e.model}", "--set", f"train.out_dir={out}",
              "--set", "adak.warm_start_steps=1", "--set", "adak.ppo_steps=1", "--set", "train.checkpoint_every=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy_done(e: Env) -> str:
    dst = e.out()
    shutil.copytree(e.done, dst)
    return dst


def _hf_copy(e: Env, name: str) -> Path:
    dst = e.work / "files" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(e.hf, dst)
    return dst


def _hf_edit(e: Env, name: str, **changes) -> str:
    d = _hf_copy(e, name)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _truncated_hf(e: Env) -> str:
    d = _hf_copy(e, "hf_trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(d)


def _truncated_pt(e: Env) -> str:
    return e.write("trunc.pt", e.model.read_bytes()[: e.model.stat().st_size // 2], binary=True)


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _good_tokens(n=6, length=20):
    return [{"tokens": [(i * 7 + j) % 64 for j in range(length)]} for i in range(n)]


_busy_sockets: list[socket.socket] = []


def _busy_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    _busy_sockets.append(s)
    return str(s.getsockname()[1])


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def mistakes(e: Env) -> list[Mistake]:
    M = Mistake
    ms = [
        # ---- config ------------------------------------------------------------------------------------------
        M("C01", "--config names a file that does not exist", lambda e: e.train(config=str(e.work / "nope.yaml")),
          ("nope.yaml", "does not exist")),
        M("C02", "--config names a directory", lambda e: e.train(config=str(e.work)), ("is a directory",)),
        M("C03", "YAML syntax error (unclosed brace)",
          lambda e: e.train(config=e.yaml("c03.yaml", "parallel: {ep: 1\n")), ("c03.yaml", "line")),
        M("C04", "empty YAML file", lambda e: e.train(config=e.yaml("c04.yaml", base=False)), ("c04.yaml", "empty")),
        M("C05", "YAML top level is a list", lambda e: e.train(config=e.yaml("c05.yaml", "- a\n- b\n", base=False)),
          ("c05.yaml", "mapping")),
        M("C06", "config file is not UTF-8",
          lambda e: e.train(config=e.write("c06.yaml", b"train: {steps: 2}\n# \xff\xfe\n", binary=True)),
          ("c06.yaml", "UTF-8")),
        M("C07", "unknown section (typo)", lambda e: e.train("trian.steps=3"), ("trian", "unknown key")),
        M("C08", "unknown key (typo)", lambda e: e.train("model.hiden_size=32"), ("model.hiden_size", "unknown key")),
        M("C09", "wrong type: steps is text", lambda e: e.train("train.steps=ten"), ("train.steps", "integer")),
        M("C10", "lr: .inf", lambda e: e.train("train.lr=.inf"), ("train.lr", "inf")),
        M("C11", "lr: .nan", lambda e: e.train("train.lr=.nan"), ("train.lr", "nan")),
        M("C12", "negative lr", lambda e: e.train("train.lr=-0.1"), ("train.lr", "-0.1")),
        M("C13", "steps: 0", lambda e: e.train("train.steps=0"), ("train.steps", ">= 1")),
        M("C14", "seq_len above max_seq_len", lambda e: e.train("train.seq_len=128"), ("train.seq_len", "128")),
        M("C15", "top_k above the number of experts", lambda e: e.train("model.moe.top_k=5"), ("model.moe.top_k",)),
        M("C16", "router: null unquoted", lambda e: e.train("model.moe.router=null"), ("model.moe.router", "quote")),
        M("C17", "unknown router", lambda e: e.train("model.moe.router=magic"), ("model.moe.router", "magic")),
        M("C18", "null experts with the top-k router", lambda e: e.train("model.moe.num_null_experts=4"),
          ("model.moe.num_null_experts",)),
        M("C19", "ep does not divide the experts", lambda e: e.train("parallel.ep=3"), ("parallel.ep", "3")),
        M("C20", "unknown data.kind", lambda e: e.train("data.kind=web"), ("data.kind", "web")),
        M("C21", "data.kind files without data.path", lambda e: e.train("data.kind=files"), ("data.path",)),
        M("C22", "--set without '='", lambda e: e.train("train.steps"), ("train.steps", "key.sub=value")),
        M("C23", "--set value is broken YAML", lambda e: e.train("train.steps=[1"), ("train.steps",)),
        M("C24", "--set into a value, not a section", lambda e: e.train("train.steps.x=1"), ("steps",)),
        M("C25", "grad_accum_steps does not divide batch_size", lambda e: e.train("train.grad_accum_steps=3"),
          ("train.grad_accum_steps", "3")),
        M("C26", "trainable is not a valid regex", lambda e: e.train("train.trainable=['router[']"),
          ("train.trainable[0]",)),
        M("C27", "aux_loss_coef: .inf", lambda e: e.train("model.moe.aux_loss_coef=.inf"),
          ("model.moe.aux_loss_coef",)),
        M("C28", "capacity_factor: .nan", lambda e: e.train("model.moe.capacity_factor=.nan"),
          ("model.moe.capacity_factor",)),
        M("C29", "rope_theta: .inf", lambda e: e.train("model.rope_theta=.inf"), ("model.rope_theta",)),
        M("C30", "rendezvous_timeout_s: .inf", lambda e: e.train("parallel.rendezvous_timeout_s=.inf"),
          ("parallel.rendezvous_timeout_s",)),
        M("C31", "keep_last: -1", lambda e: e.train("train.keep_last=-1"), ("train.keep_last",)),
        M("C32", "compute budget outside what k allows",
          lambda e: e.train("model.moe.router=null_experts", "model.moe.num_null_experts=4", "model.moe.top_k=2",
                            "model.moe.target_true_experts=3.0"), ("model.moe.target_true_experts",)),
        M("C33", "unknown family", lambda e: e.train("model.family=llama"), ("model.family", "llama")),
        M("C34", "min_lr_ratio: 2", lambda e: e.train("train.min_lr_ratio=2"), ("train.min_lr_ratio",)),
        M("C35", "beta2: .nan", lambda e: e.train("train.beta2=.nan"), ("train.beta2",)),
        # ---- data --------------------------------------------------------------------------------------------
        M("D01", "data.path does not exist", lambda e: e.files(str(e.work / "nodata.jsonl")),
          ("data.path", "nodata.jsonl")),
        M("D02", "data.path is an empty folder",
          lambda e: e.files(str((e.work / "files" / "emptydir").mkdir(parents=True, exist_ok=True)
                                or e.work / "files" / "emptydir")), ("data.path", "emptydir")),
        M("D03", "data.val_path has a typo",
          lambda e: e.tokens(str(e.data / "train.jsonl"), f"data.val_path={e.data / 'vall.jsonl'}"),
          ("data.val_path", "vall.jsonl")),
        M("D04", "empty jsonl file", lambda e: e.tokens(e.write("d04.jsonl", "")), ("d04.jsonl",)),
        M("D05", "malformed JSON line",
          lambda e: e.tokens(e.write("d05.jsonl", _jsonl(_good_tokens(2)) + '{"tokens": [1, 2,\n')),
          ("d05.jsonl", "line 3")),
        M("D06", "text file is not UTF-8",
          lambda e: e.files(e.write("d06.txt", b"hello \xff\xfe world\n" * 40, binary=True), "model.vocab_size=258"),
          ("d06.txt", "UTF-8")),
        M("D07", "text_field missing from the records",
          lambda e: e.files(e.write("d07.jsonl", _jsonl([{"body": "x" * 50}] * 4)), "model.vocab_size=258"),
          ("d07.jsonl", "data.text_field", "text")),
        M("D08", "token_field missing from the records",
          lambda e: e.files(str(e.data / "train.jsonl"), "data.token_field=ids"), ("data.token_field", "ids")),
        M("D09", "token ids beyond the vocabulary",
          lambda e: e.tokens(e.write("d09.jsonl", _jsonl([{"tokens": list(range(60, 80))}] * 6))),
          ("d09.jsonl", "vocab_size")),
        M("D10", "NaN token ids",
          lambda e: e.tokens(e.write("d10.jsonl", _jsonl(['{"tokens": [1, NaN, 3' + ", 4" * 20 + "]}"] * 4))),
          ("d10.jsonl", "integer")),
        M("D11", "negative token ids",
          lambda e: e.tokens(e.write("d11.jsonl", _jsonl([{"tokens": [-1] + [2] * 20}] * 4))),
          ("d11.jsonl", "-1")),
        M("D12", "token ids are strings",
          lambda e: e.tokens(e.write("d12.jsonl", _jsonl([{"tokens": ["1", "2"] * 10}] * 4))),
          ("d12.jsonl", "integer")),
        M("D13", "corpus shorter than one sequence",
          lambda e: e.tokens(e.write("d13.jsonl", _jsonl([{"tokens": [1, 2, 3]}]))), ("d13.jsonl", "seq_len")),
        M("D14", "mixed file suffixes in a folder",
          lambda e: e.files(str(e.write("d14/a.jsonl", _jsonl(_good_tokens())) and e.write("d14/b.txt", "x")
                                and e.work / "files" / "d14"), "data.token_field=tokens"), ("data.format",)),
        M("D15", "byte tokenizer with a 64-token model",
          lambda e: e.files(e.write("d15.txt", "hello world\n" * 40)), ("model.vocab_size", "258")),
        M("D16", "tokenizer folder that does not exist",
          lambda e: e.files(e.write("d16.txt", "hello world\n" * 40), f"data.tokenizer={e.work / 'notok'}",
                            "model.vocab_size=258"), ("data.tokenizer", "notok")),
        M("D17", "label_field without token_field",
          lambda e: e.files(str(e.data / "train.jsonl"), "data.label_field=labels"), ("data.label_field",)),
        M("D18", "val_sequences above what the corpus packs into",
          lambda e: e.tokens(str(e.data / "train.jsonl"), "data.val_sequences=1000"), ("data.val_sequences",)),
        M("D19", "data.format parquet on a jsonl file",
          lambda e: e.tokens(str(e.data / "train.jsonl"), "data.format=parquet"), ("train.jsonl", "parquet")),
        M("D20", "token field is a number, not a list",
          lambda e: e.tokens(e.write("d20.jsonl", _jsonl([{"tokens": 5}] * 4))), ("d20.jsonl", "list")),
        M("D21", "a malformed record far into the file",
          lambda e: e.tokens(e.write("d21.jsonl", _jsonl(_good_tokens(300) + ["not json"]))), ("d21.jsonl",)),
        M("D22", "text data whose field holds numbers",
          lambda e: e.files(e.write("d22.jsonl", _jsonl([{"text": 12345}] * 40)), "model.vocab_size=258"),
          ("d22.jsonl", "text")),
        M("D23", "val_path file is empty",
          lambda e: e.tokens(str(e.data / "train.jsonl"), f"data.val_path={e.write('d23.jsonl', '')}"),
          ("data.val_path", "d23.jsonl")),
        # ---- checkpoints and Hugging Face folders --------------------------------------------------------------
        M("K01", "init_from does not exist", lambda e: e.train(f"train.init_from={e.work / 'nomodel.pt'}"),
          ("train.init_from", "nomodel.pt")),
        M("K02", "init_from is a truncated model.pt", lambda e: e.train(f"train.init_from={_truncated_pt(e)}"),
          ("trunc.pt",)),
        M("K03", "init_from is a text file", lambda e: e.train(f"train.init_from={e.write('k03.pt', 'hello')}"),
          ("k03.pt",)),
        M("K04", "HF folder without config.json",
          lambda e: e.train(f"train.init_from={(_hf_copy(e, 'k04') / 'config.json').unlink() or e.work / 'files/k04'}"),
          ("config.json",)),
        M("K05", "HF config.json is not valid JSON",
          lambda e: e.train(f"train.init_from={(_hf_copy(e, 'k05') / 'config.json').write_text('{oops') and e.work / 'files/k05'}"),
          ("config.json", "JSON")),
        M("K06", "HF folder of an unsupported architecture",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'k06', model_type='llama')}"), ("llama",)),
        M("K07", "HF folder with a truncated safetensors file",
          lambda e: e.train(f"train.init_from={_truncated_hf(e)}"), ("model.safetensors", "truncated")),
        M("K08", "HF weights do not match config.json",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'k08', hidden_size=64)}"), ("k08", "shape")),
        M("K09", "conversion on load: num_null_experts not a multiple of n",
          lambda e: e.train(f"train.init_from={e.hf}", "model.moe.router=null_experts", "model.moe.num_null_experts=3",
                            "model.moe.top_k=2"), ("num_null_experts", "3")),
        M("K10", "conversion on load: top_k not function preserving",
          lambda e: e.train(f"train.init_from={e.model}", "model.moe.router=null_experts", "model.moe.num_null_experts=4",
                            "model.moe.top_k=5"), ("top_k",)),
        M("K11", "resume_from a folder that does not exist",
          lambda e: e.train(f"train.resume_from={e.work / 'nockpt'}"), ("nockpt",)),
        M("K12", "empty latest pointer (a fault: must resume from the newest complete checkpoint)",
          lambda e: ["train", "--config", str(e.cfg), "--set", f"train.out_dir={_emptied_latest(e)}", "--set",
                     "train.steps=3"], ("latest",), warn=True),
        M("K13", "resume with another model shape",
          lambda e: ["train", "--config", str(e.cfg), "--set", f"train.out_dir={_copy_done(e)}", "--set",
                     "train.steps=4", "--set", "model.hidden_size=64"], ("hidden_size",)),
        M("K14", "re-run a finished out_dir", lambda e: ["train", "--config", str(e.cfg), "--set",
                                                        f"train.out_dir={_copy_done(e)}"],
          ("train.out_dir", "final", "train.steps")),
        M("K15", "eval a checkpoint that does not exist", lambda e: ["eval", "--checkpoint", str(e.work / "no.pt")],
          ("no.pt",)),
        M("K16", "eval a truncated model.pt", lambda e: ["eval", "--checkpoint", _truncated_pt(e)], ("trunc.pt",)),
        M("K17", "resume_from a folder that is not a checkpoint",
          lambda e: e.train(f"train.resume_from={e.data}"), ("data",)),
        M("K18", "train.out_dir is inside a file", lambda e: e.train(f"train.out_dir={e.cfg}/run", out=False),
          ("train.out_dir",)),
        M("K19", "Ada-K without init_from", lambda e: ["adak", "--config", str(e.cfg)], ("train.init_from",)),
        M("K20", "init_from checkpoint with another vocabulary than the data",
          lambda e: e.tokens(e.write("k20.jsonl", _jsonl([{"tokens": list(range(60, 90))}] * 6)),
                             f"train.init_from={e.model}", "model.vocab_size=200"), ("k20.jsonl", "vocab")),
        # ---- command line ------------------------------------------------------------------------------------
        M("L01", "generate-data with a negative count",
          lambda e: ["generate-data", "--out", e.out(), "--num-sequences", "-5"], ("--num-sequences", "-5")),
        M("L02", "generate-data with negative val sequences",
          lambda e: ["generate-data", "--out", e.out(), "--val-sequences", "-1"], ("--val-sequences", "-1")),
        M("L03", "generate-data with a vocabulary too small",
          lambda e: ["generate-data", "--out", e.out(), "--vocab-size", "10"], ("--vocab-size", "10")),
        M("L04", "generate-data with seq-len 0",
          lambda e: ["generate-data", "--out", e.out(), "--seq-len", "0"], ("--seq-len", "0")),
        M("L05", "--nnodes 0", lambda e: ["train", "--config", str(e.cfg), "--dry-run", "--nnodes", "0"],
          ("--nnodes", "0")),
        M("L06", "--procs-per-node 0",
          lambda e: ["train", "--config", str(e.cfg), "--dry-run", "--procs-per-node", "0"], ("--procs-per-node",)),
        M("L07", "convert onto an existing destination",
          lambda e: ["convert", "--src", str(e.hf), "--dst", str(_hf_copy(e, "l07")), "--num-null-experts", "4",
                     "--top-k", "4"], ("l07", "--overwrite")),
        M("L08", "convert with m not a multiple of n",
          lambda e: ["convert", "--src", str(e.hf), "--dst", e.out(), "--num-null-experts", "3", "--top-k", "4"],
          ("num_null_experts", "3")),
        M("L09", "convert from a folder that does not exist",
          lambda e: ["convert", "--src", str(e.work / "nohf"), "--dst", e.out(), "--num-null-experts", "4",
                     "--top-k", "4"], ("nohf",)),
        M("L10", "convert with top-k 0",
          lambda e: ["convert", "--src", str(e.hf), "--dst", e.out(), "--num-null-experts", "4", "--top-k", "0"],
          ("top_k",)),
        M("L11", "generate-data onto a file", lambda e: ["generate-data", "--out", str(e.cfg)], ("tiny.yaml",)),
        M("L12", "eval with a task file that does not exist",
          lambda e: ["eval", "--checkpoint", str(e.model), "--task", str(e.work / "notask.jsonl")],
          ("notask.jsonl",)),
        # ---- eval (second round) -----------------------------------------------------------------------------
        M("E01", "eval --difficulty with --corpus-sequences 0",
          lambda e: ["eval", "--checkpoint", str(e.model), "--difficulty", "--corpus-sequences", "0",
                     "--corpus-seq-len", "16"],
          ("--corpus-sequences", "0")),
        M("E02", "eval a perplexity task with an empty text",
          lambda e: _eval_task(e, e.write("e02.jsonl", _jsonl([{"text": "1 2 3"}, {"text": ""}]))),
          ("e02.jsonl", "line 2", "empty")),
        M("E03", "eval a 400-token context on a 64-token model",
          lambda e: _eval_task(e, e.write("e03.jsonl", _jsonl([{"context": " ".join(str(i % 64) for i in range(400)),
                                                                "choices": ["1", "2"], "gold": 0}]))),
          ("e03.jsonl", "max_seq_len=64")),
        M("E04", "eval --batch-size -1", lambda e: ["eval", "--checkpoint", str(e.model), "--batch-size", "-1"],
          ("--batch-size", "-1")),
        M("E05", "eval --device cuda on a machine without CUDA",
          lambda e: ["eval", "--checkpoint", str(e.model), "--device", "cuda"], ("--device", "cuda")),
        M("E06", "eval a task file holding one JSON array",
          lambda e: _eval_task(e, e.write("e06.jsonl", json.dumps([{"text": "1 2 3"}]) + "\n")),
          ("e06.jsonl", "line 1", "object")),
        M("E07", "eval a task file that is a directory",
          lambda e: _eval_task(e, str((e.work / "files" / "e07").mkdir(parents=True, exist_ok=True)
                                      or e.work / "files" / "e07")), ("e07", "directory")),
        M("E08", "eval a task file that is a FIFO", lambda e: _eval_task(e, _fifo(e, "e08.jsonl")),
          ("e08.jsonl", "regular file")),
        M("E09", "eval /dev/zero as the task file", lambda e: _eval_task(e, "/dev/zero"),
          ("/dev/zero", "regular file")),
        M("E10", "eval --out inside a file (only found after the whole evaluation)",
          lambda e: ["eval", "--checkpoint", str(e.model), "--difficulty", "--corpus-sequences", "2",
                     "--corpus-seq-len", "16", "--out", f"{e.cfg}/res.json"], ("--out", "tiny.yaml")),
        # ---- Hugging Face folders that lie (second round) -------------------------------------------------
        M("H01", "HF config.json: hidden_size is a string",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'h01', hidden_size='32')}"),
          ("h01", "config.json", "hidden_size", "integer")),
        M("H02", "HF config.json: num_attention_heads is a string",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'h02', num_attention_heads='2')}"),
          ("h02", "num_attention_heads", "integer")),
        M("H03", "HF config.json with a quantization_config (Mixtral)",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'h03', quantization_config={'quant_method': 'fp8'})}"),
          ("h03", "quantization_config")),
        M("H04", "HF folder with int8 weights",
          lambda e: e.train(f"train.init_from={_hf_tensors(e, 'h04', 'int8')}"), ("h04", "embed_tokens", "I8")),
        M("H05", "HF folder in an FP8 layout (float8_e4m3fn weights + weight_scale_inv)",
          lambda e: e.train(f"train.init_from={_hf_tensors(e, 'h05', 'fp8')}"), ("h05", "F8_E4M3")),
        M("H06", "HF folder with a corrupt safetensors header (unknown dtype)",
          lambda e: e.train(f"train.init_from={_hf_bad_header(e)}"), ("h06", "model.safetensors")),
        M("H07", "HF DeepSeek config.json: num_attention_heads is a string",
          lambda e: e.train(f"train.init_from={_hf_edit(e, 'h07', model_type='deepseek_v3', num_attention_heads='4', num_key_value_heads=4)}"),
          ("h07", "num_attention_heads", "integer")),
        # ---- faults and mistakes, second round: Ada-K and the Hugging Face export ----------------------------
        M("R01", "Ada-K with 0 warm-start and 0 PPO steps (saved an untrained allocator, exit 0)",
          lambda e: ["adak", "--config", str(e.cfg), "--set", f"train.init_from={e.model}", "--set",
                     f"train.out_dir={e.out()}", "--set", "adak.warm_start_steps=0", "--set", "adak.ppo_steps=0"],
          ("adak.warm_start_steps", "adak.ppo_steps", "nothing would train")),
        M("R02", "train.export_hf on a Mixtral model with norm_topk_prob false (refused after the whole run)",
          lambda e: e.train("train.export_hf=true", "model.moe.norm_topk_prob=false"),
          ("train.export_hf", "norm_topk_prob")),
        M("R03", "train.export_hf on a Qwen3-MoE model with a shared expert (refused after the whole run)",
          lambda e: e.train("train.export_hf=true", "model.family=qwen3_moe",
                            "model.shared_expert_intermediate_size=16"), ("train.export_hf", "shared expert")),
        M("R04", "Ada-K resumed from its checkpoint with another adak.penalty",
          lambda e: ["adak", "--config", str(e.cfg), "--set", f"train.init_from={e.model}", "--set",
                     f"train.out_dir={_adak_done(e)}", "--set", "adak.warm_start_steps=1", "--set",
                     "adak.ppo_steps=2", "--set", "adak.penalty=0.5"], ("adak.penalty", "resume_allow_changes")),
        M("R05", "--miniature with train.export_hf the family cannot express (refused after the miniature ran)",
          lambda e: e.train("train.export_hf=true", "model.family=qwen3_moe",
                            "model.shared_expert_intermediate_size=16") + ["--miniature"],
          ("train.export_hf", "shared expert")),
        # ---- the DeepSpeed JSON ----------------------------------------------------------------------------
        M("S01", "DeepSpeed JSON: zero_optimisation (typo)",
          lambda e: _ds(e, "s01.json", {"zero_optimisation": {"stage": 3}}), ("zero_optimisation", "zero_optimization")),
        M("S02", "DeepSpeed JSON: a moe section",
          lambda e: _ds(e, "s02.json", {"moe": {"enabled": True, "ep_size": 2}}), ("s02.json", "'moe'", "parallel.ep")),
        M("S03", "DeepSpeed JSON: stage 2.5", lambda e: _ds(e, "s03.json", {"zero_optimization": {"stage": 2.5}}),
          ("zero_optimization.stage", "2.5")),
        M("S04", "DeepSpeed JSON: stage 'two'", lambda e: _ds(e, "s04.json", {"zero_optimization": {"stage": "two"}}),
          ("s04.json", "zero_optimization.stage", "two")),
        M("S05", "DeepSpeed JSON: offload_optimizer",
          lambda e: _ds(e, "s05.json", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
          ("s05.json", "offload_optimizer", "not supported")),
        M("S06", "DeepSpeed JSON: a boolean given as text",
          lambda e: _ds(e, "s06.json", {"zero_optimization": {"stage": 2, "overlap_comm": "yes"}}),
          ("s06.json", "zero_optimization.overlap_comm", "true or false")),
        # ---- world sizes that do not divide the model --------------------------------------------------------
        M("W01", "3 ranks with hidden_size 32 (FSDP shards experts on dim 1)",
          lambda e: e.train("parallel.rendezvous_timeout_s=10", "train.batch_size=6"),
          ("model.hidden_size=32", "WORLD_SIZE"),
          env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "FREE"}),
        M("W02", "--miniature of a 3-rank config with hidden_size 32",
          lambda e: e.train("parallel.world_size=3", "train.batch_size=6") + ["--miniature"],
          ("model.hidden_size=32",), timeout=120),
        M("W03", "LoRA rank 3 on experts with 2 ranks",
          lambda e: e.train("parallel.rendezvous_timeout_s=10", "train.lora_rank=3"), ("train.lora_rank=3",),
          env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "FREE"}),
        # ---- launch ------------------------------------------------------------------------------------------
        M("P01", "world size not divisible by ep", lambda e: e.train("parallel.ep=2"),
          ("WORLD_SIZE=3", "parallel.ep=2"), env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}),
        M("P02", "distributed launch without MASTER_ADDR", lambda e: e.train(), ("MASTER_ADDR",),
          env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
        M("P03", "RANK outside WORLD_SIZE", lambda e: e.train(), ("RANK=5",),
          env={"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
        M("P04", "config written for 4 ranks, launched as one", lambda e: e.train("parallel.world_size=4"),
          ("parallel.world_size=4",)),
        M("P05", "MASTER_PORT is not a number", lambda e: e.train(), ("MASTER_PORT",),
          env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}),
        M("P06", "MASTER_PORT in use by another process", lambda e: e.train("parallel.rendezvous_timeout_s=5"),
          ("MASTER_PORT", "in use"), env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "BUSY"}),
        M("P07", "WORLD_SIZE is not a number", lambda e: e.train(), ("WORLD_SIZE",),
          env={"WORLD_SIZE": "two", "RANK": "0"}),
    ]
    return ms


def _eval_task(e: Env, task: str) -> list[str]:
    return ["eval", "--checkpoint", str(e.model), "--task", task]


def _fifo(e: Env, name: str) -> str:
    p = e.work / "files" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        os.mkfifo(p)
    return str(p)


def _hf_tensors(e: Env, name: str, kind: str) -> str:
    """A copy of the HF folder whose embedding is int8 (kind int8), or in DeepSeek's FP8 layout: a float8_e4m3fn
    expert weight with its weight_scale_inv (kind fp8)."""
    import torch
    from safetensors.torch import load_file, save_file

    d = _hf_copy(e, name)
    f = d / "model.safetensors"
    sd = load_file(str(f))
    if kind == "int8":
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].to(torch.int8)
    else:
        w = next(k for k in sd if k.endswith("experts.0.w1.weight"))
        sd[w] = sd[w].to(torch.float8_e4m3fn)
        sd[w.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)
    save_file(sd, str(f), metadata={"format": "pt"})
    return str(d)


def _hf_bad_header(e: Env) -> str:
    """The header's first dtype replaced by an unknown one of the same length (the file stays complete)."""
    d = _hf_copy(e, "h06")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    i = raw.index(b'"dtype":"') + len(b'"dtype":"')
    f.write_bytes(raw[:i] + b"Q" * (raw.index(b'"', i) - i) + raw[raw.index(b'"', i):])
    return str(d)


def _ds(e: Env, name: str, ds: dict) -> list[str]:
    return e.train("parallel.engine=deepspeed", f"deepspeed.config={e.write(name, json.dumps(ds))}")


def _emptied_latest(e: Env) -> str:
    d = _copy_done(e)
    (Path(d) / "checkpoints" / "latest").write_text("")
    return d


def classify(m: Mistake, rc: Optional[int], out: str, err: str) -> str:
    if rc is None:
        return "hang"
    text = out + err
    if "Traceback (most recent call last)" in text:
        return "traceback"
    named = all(n.lower() in text.lower() for n in m.needles)
    if m.warn:
        if rc == 0 and named:
            return "clear-and-early"
        return "unclear" if rc else "silent"
    if rc == 0:
        return "silent"
    if rc != 2 or not named:
        return "unclear"
    return "clear-but-late" if MARKER in out else "clear-and-early"


def message(out: str, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if any("Traceback" in ln for ln in lines):
        return lines[-1] if lines else ""
    picked = [ln for ln in lines if ln.startswith("moe-train")] or lines[-1:] or out.strip().splitlines()[-1:]
    return picked[0] if picked else ""


def run_one(m: Mistake, e: Env) -> dict:
    env = dict(m.env)
    if env.get("MASTER_PORT") == "BUSY":
        env["MASTER_PORT"] = _busy_port()
    if env.get("MASTER_PORT") == "FREE":
        env["MASTER_PORT"] = _free_port()
    start = time.perf_counter()
    try:
        argv = m.argv(e)
        r = _cli(argv, env, m.timeout)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as ex:
        argv = ex.cmd[3:]
        rc, out, err = None, (ex.stdout or b"").decode() if isinstance(ex.stdout, bytes) else (ex.stdout or ""), ""
    seconds = time.perf_counter() - start
    cls = classify(m, rc, out, err)
    return {"id": m.id, "what": m.what, "class": cls, "rc": rc, "seconds": round(seconds, 1),
            "message": message(out, err) if rc is not None else f"(no exit within {m.timeout:g} s)",
            "argv": " ".join(str(a) for a in argv), "stderr_tail": err[-2000:]}


def run_campaign(work: Path, only: Optional[set[str]] = None, jobs: int = 1) -> list[dict]:
    e = prepare(work)
    todo = [m for m in mistakes(e) if only is None or m.id in only]
    results = []
    if jobs <= 1:
        for m in todo:
            results.append(run_one(m, e))
            print(f"{results[-1]['id']} {results[-1]['class']:<16} {results[-1]['seconds']:>5}s "
                  f"{results[-1]['message'][:140]}", flush=True)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda m: run_one(m, e), todo))
    return results


def counts(results: list[dict]) -> dict:
    c = {k: 0 for k in CLASSES}
    for r in results:
        c[r["class"]] += 1
    return {"tried": len(results), **c}


def table(results: list[dict], before: Optional[dict] = None) -> str:
    c = counts(results)
    lines = ["# Users' mistakes: what a user sees", "",
             "Made by `python bench/mistakes.py` (issue 17): every mistake below was tried through the real command "
             "line in a subprocess (tiny model, CPU) and classified: clear-and-early (exit 2, one line naming the "
             "key or file, before any process group or model), clear-but-late (the same after the model was built), "
             "unclear, traceback, silent (accepted, exit 0), hang. `tests/test_faults_inputs.py` re-runs a subset.",
             "", "## Counts", "", "| | " + " | ".join(["tried", *CLASSES]) + " |",
             "|---|" + "---|" * (len(CLASSES) + 1)]
    if before:
        lines.append("| before | " + " | ".join(str(before.get(k, "")) for k in ["tried", *CLASSES]) + " |")
    lines.append("| now | " + " | ".join(str(c[k]) for k in ["tried", *CLASSES]) + " |")
    lines += ["", "## Every mistake", "", "| id | what the user did | class | exit | s | what the user sees |",
              "|---|---|---|---|---|---|"]
    for r in results:
        msg = r["message"].replace("|", "\\|").replace(str(ROOT), ".")
        msg = msg if len(msg) <= 400 else msg[:400] + " ..."
        lines.append(f"| {r['id']} | {r['what']} | {r['class']} | {r['rc']} | {r['seconds']} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated ids")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mistakes.md"), help="the table (- for stdout)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--before", default=None, help="a JSON results file of an earlier run, for the counts row")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mistakes_"))
    results = run_campaign(work, set(args.only.split(",")) if args.only else None, args.jobs)
    before = counts(json.loads(Path(args.before).read_text())) if args.before else None
    text = table(results, before)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(counts(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
