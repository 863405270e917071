"""Held-out evaluation on the knowledge corpus, and the final chat demo.

    python -m tinyllm_mcore.quickstart.qa mcore --tokenizer-model TOK --eval-data eval.jsonl \\
        --checkpoint pretrained=ckpt/pretrain --checkpoint sft=ckpt/sft --checkpoint dpo=ckpt/dpo \\
        --eval-pairs eval_pairs.jsonl --dpo-policy dpo --dpo-reference sft --beta 0.1 \\
        --reward-model ckpt/reward --output-json eval.json
    python -m tinyllm_mcore.quickstart.qa hf --hf HF_DIR --eval-data eval.jsonl --num-questions 6

``mcore`` answers every held-out question greedily in the chat format with each megatron checkpoint (KV-cached
`tinyllm_mcore.inference.generate`) and scores, per split, (a) the fact — style-aware exact match: the full reference sentence
or the bare value, verbatim — and (b) the style: the share of answers that are a full sentence starting with the
entity (the preferred style). With ``--eval-pairs`` it also scores held-out preference pairs: DPO's implicit reward
β·(log-ratio to the reference) of the chosen and the rejected answer, and with ``--reward-model`` the reward model's
score of each, plus the reward model's verdict on the DPO model's greedy answer against the SFT model's for every
held-out question. ``hf`` loads the Hugging Face export with plain transformers (AutoModelForCausalLM + the exported
tokenizer's chat template) and prints its answers: the exported model, not ours, is what talks.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tinyllm_mcore.quickstart.corpus import fact_correct, preferred_style
from tinyllm_mcore.runtime.files import atomic_write_text
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score(records: list[dict], predictions: list[str]) -> dict:
    """{split: {"total", "correct" (fact), "accuracy", "preferred_style" (count), "preferred_style_rate"}} plus
    "all"."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for record, prediction in zip(records, predictions, strict=True):
        ok, styled = fact_correct(prediction, record), preferred_style(prediction, record)
        for split in (record.get("split", "all"), "all"):
            counts[split][0] += ok
            counts[split][1] += styled
            counts[split][2] += 1
    return {split: {"correct": c, "total": n, "accuracy": c / n, "preferred_style": p, "preferred_style_rate": p / n}
            for split, (c, p, n) in sorted(counts.items())}


def summarize_pairs(pairs: list[dict], margins) -> dict:
    """{kind: {split: {"pairs", "accuracy" (share of margin > 0), "mean_margin"}}}, with "all" at both levels;
    ``margins[i]`` is score(chosen) − score(rejected) of ``pairs[i]``."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pair, margin in zip(pairs, margins, strict=True):
        for kind in (pair.get("kind", "all"), "all"):
            for split in (pair.get("split", "all"), "all"):
                groups[kind][split].append(float(margin))
    return {kind: {split: {"pairs": len(m), "accuracy": sum(x > 0 for x in m) / len(m), "mean_margin": sum(m) / len(m)}
                   for split, m in sorted(by_split.items())} for kind, by_split in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------------------------
# Models


def answer_with_checkpoint(load: str, tokenizer, questions: list[str], batch_size: int = 64,
                           max_new_tokens: int = 32):
    """Greedy chat answers from a megatron checkpoint (TP1 in this process, whatever layout it was saved in).
    Returns (answers, model)."""
    from tinyllm_mcore.inference import generate as inference

    generator, _ = inference.load_generator(load, tokenizer)
    params = inference.SamplingParams(max_new_tokens=max_new_tokens, greedy=True,
                                      stop_ids=tuple(inference.chat_stop_ids(tokenizer))).validate()
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [tokenizer.chat_prompt_ids([{"role": "user", "content": q}])
                   for q in questions[start:start + batch_size]]
        for ids in generator.generate(prompts, params):
            answers.append(tokenizer.detokenize(ids, skip_special_tokens=True))
    return answers, generator.model


def load_reward_model(load: str):
    """The reward model of a `tinyllm_mcore.stages.reward` checkpoint at TP1 in this process."""
    from tinyllm_mcore.inference.open import open_checkpoint

    return open_checkpoint(load).model


def pair_batches(pairs: list[dict], tokenizer, seq_length: int, batch_size: int):
    """The pairs tokenized exactly as DPO / reward training sees them (PreferenceDataset, in order), in batches of
    [2·b, s] rows alternating chosen, rejected, with their attention mask."""
    from tinyllm_mcore.data.preference import PreferenceDataset
    from tinyllm_mcore.training.loop import collate
    from tinyllm_mcore.training.batches import attention_mask, flatten_pairs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        dataset = PreferenceDataset(str(path), tokenizer, seq_length, seed=None)
        if len(dataset) != len(pairs):
            raise ValueError(f"{len(pairs) - len(dataset)} of {len(pairs)} pairs do not fit {seq_length} tokens")
        batches = []
        for start in range(0, len(dataset), batch_size):
            batch = flatten_pairs(collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]))
            batches.append((batch, attention_mask(batch)))
    return batches


def pair_logps(model, batches):
    """[pairs, 2] summed answer-token log-probs (chosen, rejected) under an LM, as DPO computes them."""
    import torch

    from tinyllm_mcore.stages.dpo import sequence_logps

    with torch.no_grad():
        return torch.cat([sequence_logps(model(b["tokens"], b["position_ids"], mask, labels=b["labels"]),
                                         b["loss_mask"]).view(-1, 2) for b, mask in batches])


def pair_rewards(model, batches):
    """[pairs, 2] reward-model scores (chosen, rejected): the head's value at each answer's closing eos."""
    import torch

    from tinyllm_mcore.stages.reward import last_token_index

    scores = []
    with torch.no_grad():
        for b, mask in batches:
            per_position = model(b["tokens"], b["position_ids"], mask)
            scores.append(per_position.gather(1, last_token_index(b["loss_mask"])[:, None]).view(-1, 2))
    return torch.cat(scores)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate_checkpoints(checkpoints: dict[str, str], tokenizer_model: str, eval_data: str, *,
                         eval_pairs: str | None = None, dpo_policy: str | None = None,
                         dpo_reference: str | None = None, beta: float = 0.1, reward_model: str | None = None,
                         seq_length: int = 128, batch_size: int = 64, max_new_tokens: int = 32) -> dict:
    from tinyllm_mcore.tokenizer.core import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_model)
    records = read_jsonl(eval_data)
    pairs = read_jsonl(eval_pairs) if eval_pairs else []
    batches = pair_batches(pairs, tokenizer, seq_length, batch_size) if pairs else []
    models, logps = {}, {}
    for name, load in checkpoints.items():
        t0 = time.perf_counter()
        predictions, model = answer_with_checkpoint(load, tokenizer, [r["question"] for r in records], batch_size,
                                                    max_new_tokens)
        if name in (dpo_policy, dpo_reference) and batches:
            logps[name] = pair_logps(model, batches)
        models[name] = {"checkpoint": load, "scores": score(records, predictions),
                        "seconds": time.perf_counter() - t0,
                        "by_relation": score([{**r, "split": r["relation"]} for r in records], predictions),
                        "examples": [{"question": r["question"], "answer": r["answer"], "prediction": p}
                                     for r, p in list(zip(records, predictions))[:8]],
                        "predictions": predictions}
        summary = ", ".join(f"{split} fact {s['accuracy']:.1%} preferred style {s['preferred_style_rate']:.1%}"
                            for split, s in models[name]["scores"].items())
        print(f"[qa] {name}: {summary}", flush=True)
    results = {"models": models}

    if dpo_policy in logps and dpo_reference in logps:
        rewards = beta * (logps[dpo_policy] - logps[dpo_reference])  # DPO's implicit rewards, [pairs, 2]
        summary = summarize_pairs(pairs, (rewards[:, 0] - rewards[:, 1]).tolist())
        results["dpo_heldout_pairs"] = {"policy": dpo_policy, "reference": dpo_reference, "beta": beta,
                                        "summary": summary}
        print(f"[qa] DPO held-out pairs ({dpo_policy} vs {dpo_reference}): " + pairs_line(summary), flush=True)

    if reward_model:
        model = load_reward_model(reward_model)
        scores = pair_rewards(model, batches)
        summary = summarize_pairs(pairs, (scores[:, 0] - scores[:, 1]).tolist())
        print("[qa] reward model on held-out pairs: " + pairs_line(summary), flush=True)
        results["reward_model"] = {"checkpoint": reward_model, "heldout_pairs": summary}
        if dpo_policy in models and dpo_reference in models:
            results["reward_model"]["dpo_vs_sft"] = rank_answers(
                model, tokenizer, records, models[dpo_policy]["predictions"], models[dpo_reference]["predictions"],
                seq_length, batch_size)
            ranking = results["reward_model"]["dpo_vs_sft"]
            print(f"[qa] reward model, {dpo_policy} answer vs {dpo_reference} answer on {ranking['questions']} "
                  f"held-out questions: {dpo_policy} preferred {ranking['policy_preferred']}, {dpo_reference} preferred "
                  f"{ranking['reference_preferred']}, same answer {ranking['same_answer']}", flush=True)
    return results


def rank_answers(model, tokenizer, records: list[dict], policy: list[str], reference: list[str], seq_length: int,
                 batch_size: int) -> dict:
    """The reward model's verdict, question by question, on two models' greedy answers (identical answers tie)."""
    differing = [(r, a, b) for r, a, b in zip(records, policy, reference, strict=True) if a.strip() != b.strip()]
    wins = losses = 0
    if differing:
        scores = pair_rewards(model, pair_batches([{"prompt": r["question"], "chosen": a, "rejected": b}
                                                   for r, a, b in differing], tokenizer, seq_length, batch_size))
        wins = int((scores[:, 0] > scores[:, 1]).sum())
        losses = len(differing) - wins
    return {"questions": len(records), "same_answer": len(records) - len(differing), "policy_preferred": wins,
            "reference_preferred": losses, "policy_win_rate": wins / len(differing) if differing else None}


def pairs_line(summary: dict) -> str:
    return ", ".join(f"{kind} {s['all']['accuracy']:.1%} (margin {s['all']['mean_margin']:+.3f})"
                     for kind, s in summary.items())


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


def write_json(path: str | Path, value) -> None:
    """Atomically (temp + rename): a reader never sees half a file."""
    atomic_write_text(path, json.dumps(value, ensure_ascii=False, indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mcore", help="held-out facts, style and preference pairs of megatron checkpoints")
    m.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    m.add_argument("--tokenizer-model", required=True)
    m.add_argument("--eval-data", required=True, help="jsonl of {question, answer, split}")
    m.add_argument("--eval-pairs", default=None, help="held-out preference pairs ({prompt, chosen, rejected, kind, "
                   "split}) to score with DPO's implicit reward and the reward model")
    m.add_argument("--dpo-policy", default=None, metavar="NAME", help="the --checkpoint that DPO trained")
    m.add_argument("--dpo-reference", default=None, metavar="NAME", help="the --checkpoint DPO started from")
    m.add_argument("--beta", type=float, default=0.1, help="DPO's beta (scales the implicit reward)")
    m.add_argument("--reward-model", default=None, help="a tinyllm_mcore.stages.reward checkpoint")
    m.add_argument("--seq-length", type=int, default=128, help="pair length, as in training")
    m.add_argument("--batch-size", type=int, default=96)
    m.add_argument("--max-new-tokens", type=int, default=24)
    m.add_argument("--output-json", required=True)
    h = sub.add_parser("hf", help="answer a few questions with the Hugging Face export")
    h.add_argument("--hf", required=True)
    h.add_argument("--eval-data", required=True)
    h.add_argument("--num-questions", type=int, default=6)
    h.add_argument("--max-new-tokens", type=int, default=32)
    h.add_argument("--output-json", default=None)
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.cli.errors import run_cli

    args = build_parser().parse_args(argv)

    def run():
        if args.command == "mcore":
            checkpoints = {}
            for item in args.checkpoint:
                name, sep, load = item.partition("=")
                if not sep or not name or not load:
                    raise ValueError(f"--checkpoint wants NAME=DIR, got {item!r}")
                checkpoints[name] = load
            for flag in ("dpo_policy", "dpo_reference"):
                if getattr(args, flag) not in (None, *checkpoints):
                    raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: not a --checkpoint name")
            if args.reward_model and not args.eval_pairs:
                raise ValueError("--reward-model needs --eval-pairs")
            results = evaluate_checkpoints(
                checkpoints, args.tokenizer_model, args.eval_data, eval_pairs=args.eval_pairs,
                dpo_policy=args.dpo_policy, dpo_reference=args.dpo_reference, beta=args.beta,
                reward_model=args.reward_model, seq_length=args.seq_length, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens)
            write_json(args.output_json, results)
        else:
            records = pick_chat_questions(read_jsonl(args.eval_data), args.num_questions)
            answers = chat_with_hf(args.hf, [r["question"] for r in records], args.max_new_tokens)
            dialogue = []
            for record, answer in zip(records, answers):
                ok, styled = fact_correct(answer, record), preferred_style(answer, record)
                dialogue.append({"question": record["question"], "answer": answer, "reference": record["answer"],
                                 "split": record.get("split"), "correct": ok, "preferred_style": styled})
                verdict = ("correct" if ok else "expected " + record["answer"]) + (
                    ", full sentence" if styled else ", not a full sentence")
                print(f"<|user|> {record['question']}\n<|assistant|> {answer}   [{verdict}]", flush=True)
            if args.output_json:
                write_json(args.output_json, dialogue)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
