"""Shared by the SFT / DPO / reward / inference tests: a tiny tokenizer and model trained on the quickstart's
synthetic knowledge corpus, and in-memory chat / preference samples in the data contract (dicts of tensors:
tokens, labels = tokens shifted by one, loss_mask on assistant tokens, position_ids; preference samples stacked on a
leading dim 2 = chosen, rejected)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

SEQ = 32


@functools.lru_cache(maxsize=None)
def corpus(num_countries: int = 8):
    from tinyllm_mcore.quickstart.corpus import build_corpus

    return build_corpus(seed=7, num_countries=num_countries, num_unseen=2, docs_per_country=6, dpo_pairs_per_fact=2)


@functools.lru_cache(maxsize=None)
def tokenizer():
    """Trained once per test session; worker processes load the same model via TINYLLM_TEST_TOKENIZER."""
    import os

    from tinyllm_mcore.tokenizer.core import Tokenizer
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    if os.environ.get("TINYLLM_TEST_TOKENIZER"):
        return Tokenizer.load(os.environ["TINYLLM_TEST_TOKENIZER"])
    out = Path(tempfile.mkdtemp(prefix="tinyllm_posttrain_tok_"))
    paths = corpus().write(out / "corpus")
    return train_tokenizer(str(paths["tokenizer"]), out / "tok", vocab_size=700, character_coverage=1.0,
                           num_threads=1, hard_vocab_limit=False)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def chat_sample(tok, messages, seq_length=SEQ) -> dict:
    segments = tok.encode_conversation(messages, system="")  # no system block: shorter sequences
    ids, trained = [], []
    for i, segment in enumerate(segments):
        ids += segment
        trained += [i % 2 == 1] * len(segment)
    if len(ids) > seq_length + 1:
        raise ValueError(f"conversation of {len(ids)} tokens exceeds seq {seq_length}")
    pad = seq_length + 1 - len(ids)
    ids, trained = ids + [tok.pad] * pad, trained + [False] * pad
    tokens = torch.tensor(ids[:-1])
    return {"tokens": tokens, "labels": torch.tensor(ids[1:]),
            "loss_mask": torch.tensor(trained[1:], dtype=torch.float32),
            "position_ids": torch.arange(seq_length)}


def sft_dataset(records, seq_length=SEQ):
    tok = tokenizer()
    return ListDataset([chat_sample(tok, [{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": r["answer"]}], seq_length)
                        for r in records])


def preference_dataset(records, seq_length=SEQ):
    tok = tokenizer()
    samples = []
    for r in records:
        pair = [chat_sample(tok, [{"role": "user", "content": r["prompt"]},
                                  {"role": "assistant", "content": r[k]}], seq_length) for k in ("chosen", "rejected")]
        samples.append({k: torch.stack([pair[0][k], pair[1][k]]) for k in pair[0]})
    return ListDataset(samples)


def common_flags(tmp, *extra):
    return ["--model-size", "tiny", "--vocab-size", str(tokenizer().vocab_size), "--seq-length", str(SEQ),
            "--log-interval", "1000", "--seed", "1", *extra]


def sft_provider(records_train, records_valid=()):
    def provider(ctx):
        return sft_dataset(records_train), (sft_dataset(records_valid) if records_valid else None), None
    return provider


def preference_provider(records_train, records_valid=()):
    def provider(ctx):
        return (preference_dataset(records_train), preference_dataset(records_valid) if records_valid else None,
                None)
    return provider


def tokenizer_path() -> str:
    return tokenizer().model_path


def run_stage(stage, argv):
    """Train a stage in this process and tear the runtime down again; returns the loop's result."""
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import parse_args, train

    try:
        return train(stage, parse_args(stage, argv), tokenizer())
    finally:
        rt.destroy()


SFT_ITERS = 150


@functools.lru_cache(maxsize=None)
def checkpoints() -> dict[str, Path]:
    """An initial ("pretrained") checkpoint and the SFT model trained from it on the corpus' SFT pairs."""
    from tinyllm_mcore.stages import sft

    root = Path(tempfile.mkdtemp(prefix="tinyllm_posttrain_ckpt_"))
    stage = sft.make_stage(sft_provider(corpus().sft))
    run_stage(stage, common_flags(root, "--train-iters", "0", "--micro-batch-size", "1", "--save", str(root / "init")))
    run_stage(stage, common_flags(root, "--train-iters", str(SFT_ITERS), "--micro-batch-size", "16", "--lr", "3e-3",
                                  "--min-lr", "3e-4", "--load", str(root / "init"), "--finetune",
                                  "--save", str(root / "sft"), "--save-interval", "50", "--log-interval", "25"))
    # "sft_early": an SFT model that still confuses some facts (DPO's starting point in test_dpo)
    return {"root": root, "init": root / "init", "sft": root / "sft", "sft_early": root / "sft" / "iter_0000050"}


def answer_questions(load, questions, max_new_tokens=24) -> list[str]:
    """Greedy chat answers (no system block, as trained) from a checkpoint, in one batch."""
    from tinyllm_mcore.inference import generate as inference
    from tinyllm_mcore.runtime import distributed as rt

    tok = tokenizer()
    try:
        generator, _ = inference.load_generator(str(load), tok)
        prompts = [tok.chat_prompt_ids([{"role": "user", "content": q}], system="") for q in questions]
        params = inference.SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                                          stop_ids=inference.chat_stop_ids(tok))
        return [tok.detokenize(ids, skip_special_tokens=True) for ids in generator.generate(prompts, params)]
    finally:
        rt.destroy()


def accepted_answer(answer: str, record: dict) -> bool:
    """The corpus teaches each question in two styles (full sentence, bare value): either is the fact, verbatim."""
    from tinyllm_mcore.quickstart.corpus import exact_match, fact_correct

    if "relation" in record:  # evaluation records carry what fact_correct needs
        return fact_correct(answer, record)
    taught = {r["answer"] for r in corpus().sft if r["question"] == record["question"]} | {record["answer"]}
    return any(exact_match(answer, a) for a in taught)


def exact_match_rate(load, records) -> float:
    answers = answer_questions(load, [r["question"] for r in records])
    return sum(accepted_answer(a, r) for a, r in zip(answers, records)) / len(records)
