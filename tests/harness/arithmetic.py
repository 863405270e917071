"""Shared by the GRPO tests: reasoning-gym's chain_sum task (three one-digit terms), a character-level tokenizer
trained on its text, and a tiny model SFT'd on its answers far enough that some sampled answers are right.

The task flags of every GRPO run in the tests are TASK_FLAGS; `checkpoints()` trains once per test session."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path


from tests.harness.post_training_data import ListDataset, chat_sample

TASK = "chain_sum"
TASK_CONFIG = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
TASK_FLAGS = ("--task", TASK, "--task-config", json.dumps(TASK_CONFIG), "--heldout-size", "64", "--system-prompt", "")
SEQ = 40
SFT_ITERS = 60


@functools.lru_cache(maxsize=None)
def source(seed: int = 1, heldout_size: int = 64):
    from tinyllm_mcore.data.verifiable_prompts import TaskSource

    return TaskSource(TASK, seed=seed, config=TASK_CONFIG, heldout_size=heldout_size)


def train_records(n: int, start: int = 0) -> list[dict]:
    task = source()
    return [{"question": item.question, "answer": item.answer}
            for item in (task.train_item(start + i) for i in range(n))]


@functools.lru_cache(maxsize=None)
def tokenizer():
    """Trained once per test session; worker processes load the same model via TINYLLM_TEST_TOKENIZER."""
    import os

    from tinyllm_mcore.tokenizer.core import Tokenizer
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    if os.environ.get("TINYLLM_TEST_TOKENIZER"):
        return Tokenizer.load(os.environ["TINYLLM_TEST_TOKENIZER"])
    out = Path(tempfile.mkdtemp(prefix="tinyllm_arith_tok_"))
    text = out / "text.jsonl"
    with open(text, "w", encoding="utf-8") as f:
        for r in train_records(400):
            f.write(json.dumps({"text": r["question"] + " " + r["answer"]}) + "\n")
    chars = {c for r in train_records(400) for c in r["question"] + r["answer"] + " "}
    return train_tokenizer(str(text), out / "tok", vocab_size=len(chars) + 3 + 4 + 256 + 1 + 64,
                           character_coverage=1.0, num_threads=1, hard_vocab_limit=False)


def sft_dataset(records, seq_length: int = SEQ):
    tok = tokenizer()
    return ListDataset([chat_sample(tok, [{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": r["answer"]}], seq_length)
                        for r in records])


def sft_provider(records):
    def provider(ctx):
        return sft_dataset(records), None, None
    return provider


def run_stage(stage, argv):
    """Train a stage in this process with this tokenizer and tear the runtime down again; the loop's result."""
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import parse_args, train

    try:
        return train(stage, parse_args(stage, argv), tokenizer())
    finally:
        rt.destroy()


def common_flags(*extra) -> list[str]:
    return ["--model-size", "tiny", "--tokenizer-model", tokenizer().model_path, "--seq-length", str(SEQ),
            "--log-interval", "1000", "--seed", "1", *extra]


@functools.lru_cache(maxsize=None)
def checkpoints() -> dict[str, Path]:
    """"init" (random weights) and "sft" (chain_sum answers learnt in part: some samples right, not all)."""
    from tinyllm_mcore.stages import sft

    root = Path(tempfile.mkdtemp(prefix="tinyllm_arith_ckpt_"))
    stage = sft.make_stage(sft_provider(train_records(2000)))
    flags = common_flags("--micro-batch-size", "32")
    run_stage(stage, [*flags, "--train-iters", "0", "--save", str(root / "init")])
    run_stage(stage, [*flags, "--train-iters", str(SFT_ITERS), "--lr", "3e-3", "--min-lr", "3e-4",
                      "--load", str(root / "init"), "--finetune", "--save", str(root / "sft")])
    return {"root": root, "init": root / "init", "sft": root / "sft"}
