"""Evaluation. Depends on model/, routing/, io/ and data/, never on train/ (the trainer calls into eval/).

    codec.py            text <-> token ids, lm-eval's context / continuation split
    scoring.py          routing control (greedy / forced k), experts-per-token statistics, log-likelihood primitives
    report.py           the one validation report (loss, experts per token by layer and difficulty, FLOPs)
    tasks.py            multiple-choice and perplexity task files
    generate.py         greedy generation
    lm_eval_adapter.py  the lm-evaluation-harness model type (optional dependency lm-eval)
    evaluate.py         the `moe-train eval` job (EvalConfig, run_eval)
"""
