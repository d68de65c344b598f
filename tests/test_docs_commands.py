"""Every fenced bash command of README.md and docs/*.md runs: each is run at tiny size (TINY overrides appended to
train / adak, small eval sizes) in a scratch folder that sees the repository's configs/ and tests/data, one document
after another in the order written (a command may use what the one before wrote), or is listed in SKIP with the
reason it cannot run here. A command neither run nor skipped fails the test, so a new doc command needs a decision."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# command prefix -> why it is not run here
SKIP = {
    "python3 -m venv": "installs packages (network); CI's clean-clone install covers it",
    "pip install": "installs packages (network)",
    "moe-train train --config configs/mixtral_8x22b_adamoe.yaml --miniature": "16 gloo ranks: tests/test_miniatures.py",
    "moe-train adak --config configs/adak_mixtral_8x22b.yaml --miniature": "16 gloo ranks: tests/test_miniatures.py",
    "torchrun --nproc-per-node 16": "16 ranks: tests/test_miniatures.py",
    "torchrun --nnodes 2": "a second node",
    "torchrun --nproc_per_node 2": "two gloo ranks: tests/test_launch.py runs the same launch",
    "torchrun --nproc_per_node 4": "a DeepSpeed resume at another layout (4 ranks): tests/test_deepspeed_reshard.py",
    "deepspeed --num_gpus 8": "8 GPUs",
    "moe-train train --config configs/mixtral_8x7b_adamoe.yaml --miniature --set parallel.engine=deepspeed":
        "8 gloo ranks under DeepSpeed: tests/test_deepspeed.py",
    "python bench/fidelity.py": "a sweep of many trainings (minutes); tests/test_fidelity* cover bench/fidelity.py",
    "python bench/scaling.py": "a GPU-free but long sweep; tests/test_planner_bench.py covers it",
}
TINY_TRAIN = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
              "--set", "data.num_sequences=16", "--set", "data.val_sequences=4", "--set", "train.tensorboard=false",
              "--set", "train.log_every=1"]
TINY_ADAK = ["--set", "adak.warm_start_steps=2", "--set", "adak.ppo_steps=2"]
TINY_EVAL = ["--corpus-sequences", "4", "--corpus-seq-len", "32", "--max-new-tokens", "4"]


def doc_commands(path: Path) -> list[str]:
    """The commands of the ```bash blocks of ``path``: continuation lines joined, comments and blank lines out."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


def tiny(command: str) -> list[str]:
    """The command at tiny size, as an argv."""
    argv = shlex.split(command)
    if argv[:2] in (["moe-train", "train"], ["moe-train", "adak"]) and "--check" not in argv:
        argv += TINY_TRAIN + (TINY_ADAK if argv[1] == "adak" else [])
        if "tiny_adamoe.yaml" in command:  # seq_len 32 against tiny_adamoe's max_seq_len 256: fine
            pass
    if argv[:2] == ["moe-train", "eval"]:
        argv = [a for a in argv if a != "--lm-eval"] + TINY_EVAL  # lm-eval: tests/test_eval.py (slow import)
    if argv[:2] == ["moe-train", "plan"]:
        pass  # the planner works on the meta device: real sizes are cheap
    return argv


def _workdir(tmp: Path) -> Path:
    for name in ("configs", "tests", "docs"):
        (tmp / name).mkdir(exist_ok=True) if name == "docs" else (tmp / name).symlink_to(REPO / name)
    return tmp


def test_every_doc_command_is_run_or_skipped_with_a_reason():
    commands = [c for doc in DOCS for c in doc_commands(doc)]
    assert commands, "no bash blocks found"
    unknown = [c for c in commands if not skip_reason(c) and not c.startswith(("moe-train ", "python ", "NPROC=",
                                                                                 "DRY_RUN="))]
    assert not unknown, f"doc commands neither run here nor in SKIP: {unknown}"


@pytest.mark.parametrize("doc", [d for d in DOCS if any(not skip_reason(c) for c in doc_commands(d))],
                         ids=lambda d: d.name)
def test_doc_commands_run_at_tiny_size(doc, tmp_path):
    work = _workdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for command in doc_commands(doc):
        if skip_reason(command):
            continue
        result = subprocess.run(tiny(command), cwd=work, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{doc.name}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
