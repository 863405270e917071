"""Exact-match question answering on the knowledge corpus's held-out questions, and the final chat demo.

    python -m tinyllm_mcore.quickstart.qa mcore --tokenizer-model TOK --eval-data eval.jsonl \\
        --checkpoint pretrained=ckpt/pretrain --checkpoint sft=ckpt/sft --output-json eval.json
    python -m tinyllm_mcore.quickstart.qa hf --hf HF_DIR --eval-data eval.jsonl --num-questions 6

``mcore`` answers every question greedily in the chat format with each megatron checkpoint (KV-cached
`tinyllm_mcore.inference`), and scores exact match per split. ``hf`` loads the Hugging Face export with plain
transformers (AutoModelForCausalLM + the exported tokenizer's chat template) and prints its answers: the exported
model, not ours, is what talks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from tinyllm_mcore.quickstart.corpus import exact_match


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score(records: list[dict], predictions: list[str]) -> dict:
    """{split: {"correct", "total", "accuracy"}} plus "all"."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record, prediction in zip(records, predictions, strict=True):
        ok = exact_match(prediction, record["answer"])
        for split in (record.get("split", "all"), "all"):
            counts[split][0] += ok
            counts[split][1] += 1
    return {split: {"correct": c, "total": n, "accuracy": c / n} for split, (c, n) in sorted(counts.items())}


def answer_with_checkpoint(load: str, tokenizer, questions: list[str], batch_size: int = 64,
                           max_new_tokens: int = 32) -> list[str]:
    """Greedy chat answers from a megatron checkpoint (TP1 in this process, whatever layout it was saved in)."""
    from tinyllm_mcore import inference

    generator, _ = inference.load_generator(load, tokenizer)
    params = inference.SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                                      stop_ids=tuple(inference.chat_stop_ids(tokenizer))).validate()
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.chat_prompt_ids([{"role": "user", "content": q}])
                   for q in questions[start:start + batch_size]]
        for ids in generator.generate(prompts, params):
            answers.append(tokenizer.detokenize(ids, skip_special_tokens=True))
    return answers


def evaluate_checkpoints(checkpoints: dict[str, str], tokenizer_model: str, eval_data: str,
                         batch_size: int = 64, max_new_tokens: int = 32) -> dict:
    from tinyllm_mcore.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_model)
    records = read_jsonl(eval_data)
    results = {}
    for name, load in checkpoints.items():
        t0 = time.perf_counter()
        predictions = answer_with_checkpoint(load, tokenizer, [r["question"] for r in records], batch_size,
                                             max_new_tokens)
        results[name] = {"checkpoint": load, "scores": score(records, predictions),
                         "seconds": time.perf_counter() - t0,
                         "by_relation": score([{**r, "split": r.get("relation", "all")} for r in records], predictions),
                         "examples": [{"question": r["question"], "answer": r["answer"], "prediction": p}
                                      for r, p in list(zip(records, predictions))[:8]],
                         "predictions": predictions}
        summary = ", ".join(f"{split} {s['correct']}/{s['total']} = {s['accuracy']:.1%}"
                            for split, s in results[name]["scores"].items())
        print(f"[qa] {name}: {summary}", flush=True)
    return results


def chat_with_hf(hf_dir: str, questions: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers from the Hugging Face export (transformers only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def pick_chat_questions(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A deterministic spread of held-out questions: splits alternate, relations rotate, no entity twice."""
    import random

    rng = random.Random(seed)
    splits = sorted({r.get("split", "all") for r in records})
    relations = sorted({r.get("relation", "") for r in records})
    picked, used = [], set()
    for i in range(4 * n):
        if len(picked) == min(n, len(records)):
            break
        split, relation = splits[i % len(splits)], relations[i % len(relations)]
        pool = [r for r in records if r.get("split", "all") == split and r.get("relation", "") == relation
                and r.get("entity") not in used]
        if pool:
            choice = rng.choice(pool)
            picked.append(choice)
            used.add(choice.get("entity"))
    return picked


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mcore", help="exact match of megatron checkpoints")
    m.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    m.add_argument("--tokenizer-model", required=True)
    m.add_argument("--eval-data", required=True, help="jsonl of {question, answer, split}")
    m.add_argument("--batch-size", type=int, default=96)
    m.add_argument("--max-new-tokens", type=int, default=24)
    m.add_argument("--output-json", required=True)
    h = sub.add_parser("hf", help="answer a few questions with the Hugging Face export")
    h.add_argument("--hf", required=True)
    h.add_argument("--eval-data", required=True)
    h.add_argument("--num-questions", type=int, default=6)
    h.add_argument("--max-new-tokens", type=int, default=32)
    h.add_argument("--output-json", default=None)
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.training.errors import run_cli

    args = build_parser().parse_args(argv)

    def run():
        if args.command == "mcore":
            checkpoints = {}
            for item in args.checkpoint:
                name, sep, load = item.partition("=")
                if not sep or not name or not load:
                    raise ValueError(f"--checkpoint wants NAME=DIR, got {item!r}")
                checkpoints[name] = load
            results = evaluate_checkpoints(checkpoints, args.tokenizer_model, args.eval_data, args.batch_size,
                                           args.max_new_tokens)
            Path(args.output_json).write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
        else:
            records = pick_chat_questions(read_jsonl(args.eval_data), args.num_questions)
            answers = chat_with_hf(args.hf, [r["question"] for r in records], args.max_new_tokens)
            dialogue = []
            for record, answer in zip(records, answers):
                ok = exact_match(answer, record["answer"])
                dialogue.append({"question": record["question"], "answer": answer, "reference": record["answer"],
                                 "split": record.get("split"), "correct": ok})
                print(f"<|user|> {record['question']}\n<|assistant|> {answer}   "
                      f"[{'correct' if ok else 'expected ' + record['answer']}]", flush=True)
            if args.output_json:
                Path(args.output_json).write_text(json.dumps(dialogue, ensure_ascii=False, indent=1),
                                                  encoding="utf-8")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
