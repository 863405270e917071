"""Evaluation: CMMLU / C-Eval multiple choice (ppl and gen modes) and held-out perplexity, on an mcore checkpoint
(any TP/PP) or a Hugging Face export. `tools/evaluate.py` is the CLI.

    data.py             CMMLU / C-Eval CSV readers; malformed rows are skipped and counted with their reason
    subjects.py         subject -> Chinese name and category tables (CMMLU's five categories, C-Eval's four)
    encoders.py         text -> ids with the project's Tokenizer or an HF tokenizer (same ids on an export)
    backends.py         CausalLM: logits at chosen positions only; HFCausalLM, McoreCausalLM (TP gather, PP schedule)
    multiple_choice.py  prompts, batched continuation scoring (shared rows, shared k-shot prefix), gen-mode parsing,
                        per-subject / category / overall accuracy, markdown
    perplexity.py       loss and perplexity over windows of indexed (.bin/.idx) or jsonl data
    lm_eval_compat.py   the same questions through lm-evaluation-harness, for cross-checking
    runner.py           open a model (mcore or HF) + tokenizer; write result files
"""
