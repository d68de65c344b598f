"""lm-evaluation-harness adapter: a model type ``moe_train`` for ``lm_eval.simple_evaluate`` / the lm_eval CLI.

    import moe_train.eval.lm_eval_adapter                 # registers "moe_train"
    lm_eval.simple_evaluate(model="moe_train", model_args={"checkpoint": "runs/adak/final/model.pt",
                            "tokenizer": "ids"}, tasks=[...], task_manager=TaskManager(include_path=dir))
    or an instance: simple_evaluate(model=MoETrainLM(model=m, tokenizer="ids"), ...)

The requests are scored by the same primitives as ``moe-train eval`` (moe_train/eval/codec.py and scoring.py:
lm-eval's context/continuation split, left truncation and rolling windows), so both report the same accuracy. Ada-K
models run with the greedy allocator (or ``force_k``); ``lm.k_stats.summary()`` holds the mean true experts per
token over every position the harness scored, and ``lm.report()`` adds the FLOPs versus the top-k baseline.
``write_task_yaml`` writes an offline task over a local JSONL file (dataset_path: json); ``run_lm_eval`` runs task
files through the harness. Nothing here touches the environment: run with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
so nothing is fetched (``moe-train eval --lm-eval`` sets both, unless already set, before lm-eval is imported).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'moe_train[eval]' "
                      "(lm-eval==0.4.13)") from e
import torch

from moe_train.eval.codec import build_codec, encode_pair, prefix_id
from moe_train.eval.generate import greedy_generate
from moe_train.eval.scoring import KStats, eval_routing, flops_fields, rolling_loglikelihood, score_continuations
from moe_train.eval.tasks import load_task
from moe_train.io import load_any
from moe_train.model import MoETransformer


@register_model("moe_train", "moe-train")
class MoETrainLM(LM):
    def __init__(self, checkpoint: Optional[str] = None, model: Optional[MoETransformer] = None,
                 tokenizer: str = "ids", batch_size: Union[int, str] = 16, max_batch_size: Optional[int] = None,
                 device: str = "cpu", force_k: Optional[int] = None, max_gen_toks: int = 256, **unused):
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("MoETrainLM needs exactly one of checkpoint= (model.pt or a Hugging Face folder) "
                             "and model= (a loaded MoETransformer)")
        if unused:
            raise ValueError(f"MoETrainLM: unknown model_args {sorted(unused)}; allowed: checkpoint, model, tokenizer,"
                             " batch_size, device, force_k, max_gen_toks")
        self._device = torch.device(device)
        self.model = (load_any(checkpoint) if model is None else model).to(self._device)
        self.codec = build_codec(tokenizer, self.model.config.vocab_size)
        if batch_size == "auto" or str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the moe_train adapter: give an integer")
        self.batch_size = int(batch_size)
        self.force_k = None if force_k is None else int(force_k)
        self.max_gen_toks = int(max_gen_toks)
        self.k_stats = KStats(self.model.config.num_moe_layers)

    # --- the three request types ---------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.codec, *req.args) for req in requests]
        with eval_routing(self.model, self.force_k):
            return score_continuations(self.model, pairs, self.batch_size, self._device, self.k_stats)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        with eval_routing(self.model, self.force_k):
            for req in requests:
                ids = self.codec.encode(req.args[0])
                out.append(rolling_loglikelihood(self.model, ids, prefix_id(self.codec), self.batch_size,
                                                 self._device, self.k_stats))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) not in (0, 0.0):
                raise ValueError(f"the moe_train adapter decodes greedily; got gen_kwargs {gen_kwargs}")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ctx = self.codec.encode(context) if context else [prefix_id(self.codec)]
            head = self.codec.decode(ctx)

            def text_of(new_ids, ctx=ctx, head=head):
                return self.codec.decode(ctx + new_ids)[len(head):]

            def stop(new_ids):
                return any(u in text_of(new_ids) for u in until)

            eos = getattr(self.codec, "eos_id", None)
            new, _ = greedy_generate(self.model, ctx, max_new, stop_ids=() if eos is None else (eos,),
                                     device=self._device, force_k=self.force_k, stop_fn=stop if until else None)
            text = text_of(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out

    # --- reporting ----------------------------------------------------------------------------------------

    def report(self) -> dict:
        """Mean true experts per token (overall, per layer) over the scored positions, and FLOPs vs top-k."""
        rep = self.k_stats.summary()
        rep.update(flops_fields(self.model, rep["mean_k_per_layer"], self.model.config.max_seq_len))
        return rep


def write_task_yaml(name: str, data_file: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """An offline lm-eval task over a local JSONL file in moe-train eval's format (multiple choice: context /
    choices / gold; perplexity: text). Returns the YAML path; pass out_dir as TaskManager(include_path=...)."""
    data_file = Path(data_file).resolve()
    kind, _ = load_task(data_file)
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            f"test_split: test\n")
    if kind == "multiple_choice":
        body = ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    else:
        body = ("output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
                "metric_list:\n"
                "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
                "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
                "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(head + body + "metadata:\n  version: 1.0\n")
    return path


def run_lm_eval(model: MoETransformer, task_files: Sequence[str], tokenizer: str, batch_size: int,
                device: str, force_k: Optional[int] = None) -> dict:
    """The task files through lm-evaluation-harness (task YAMLs written to a temporary folder): its metrics per
    file, and the mean true experts per token and FLOPs over everything it scored. Offline: module docstring."""
    import lm_eval  # the evaluator half of lm-eval (slow to import): only when a run asks for it
    from lm_eval.tasks import TaskManager

    lm = MoETrainLM(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device, force_k=force_k)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, f in enumerate(task_files):
            name = f"moe_train_{i}_{Path(f).stem}".replace("-", "_").replace(".", "_")
            write_task_yaml(name, f, tmp)
            names.append(name)
        manager = TaskManager(include_path=tmp, include_defaults=False)  # indexing the built-in tasks takes minutes
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                      log_samples=False)
    out = {f: {k: v for k, v in res["results"][n].items() if isinstance(v, (int, float))}
           for f, n in zip(task_files, names)}
    return {"tasks": out, **lm.report()}
